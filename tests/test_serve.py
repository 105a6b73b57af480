"""`jllm serve`: the OpenAI API against jllm.generate, streaming, cancellation, bad input,
back-pressure, graceful shutdown, chat templates and the load generator (CPU, tiny model).

Servers run the real engine on 127.0.0.1 on a free port, in a thread (or a subprocess for
SIGTERM), and stop by themselves. The references from jllm.generate keep to prompt buckets 16 and
32 and a 64-slot cache (max_tokens 16), so they compile a handful of times; the engines share
one step configuration, compiled once. A SlowEngine (a sleep before each step, as a slower
device would take) keeps requests in flight long enough to disconnect or signal mid-way.
"""
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest

# The official client is a test dependency (the [test] extra, so CI has it); a GPU machine that
# runs `pytest -m gpu` may lack it, and must still collect this file.
openai = pytest.importorskip("openai")
from conftest import ROOT
from serve_worker import SlowEngine

import jllm
from jllm.engine import Engine, SamplingParams
from jllm.guided import Guided
from jllm.serve import cli as serve_cli
from jllm.serve.tools import check_tools, render_messages, tool_guide
from jllm.serve import loadgen
from jllm.serve.app import create_app
from jllm.chat import ChatTemplate, chat_ids, read_template
from jllm.serve.main import bind, make_server
from jllm.serve.runner import EngineRunner
from jllm.tokenizer import format_chat

N = 16            # max_tokens of most requests
NAME = "tiny"
PROMPTS = ["Hello world", "The quick brown fox", "Return the value", "A list of"]

LLAMA2_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}{% set loop_messages = messages %}"
    "{% set system_message = false %}{% endif %}{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}")
# A ChatML-style template with the features templates use: trim/lstrip, loop controls, tojson,
# namespaces and a generation prompt.
CHATML_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% for message in messages %}
    {% if message['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
    {% if loop.last %}{% break %}{% endif %}
{% endfor %}
{% if add_generation_prompt %}<|im_start|>assistant {{ {"turns": ns.n, "note": "é<&>"} | tojson }}
{% endif %}"""


def ref(model, prompt, max_tokens=N, **kw):
    [out] = jllm.generate(model, prompt if isinstance(prompt, str) else [prompt],
                          max_new_tokens=max_tokens, **kw)
    return out


class ThreadServer:
    """create_app + make_server on a free port of 127.0.0.1, served from a thread."""

    def __init__(self, engine, model, chat_template=None):
        self.engine, self.model = engine, model
        self.runner = EngineRunner(engine)
        self.app = create_app(self.runner, NAME, cfg=model.cfg, tokenizer=model.tokenizer,
                              chat_template=chat_template)
        self.sock = bind("127.0.0.1", 0)
        self.server = make_server(self.app, self.sock, shutdown_timeout=5)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()
        assert not self.thread.is_alive()

    def client(self, **kw) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="none", max_retries=0, timeout=60, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        [value] = re.findall(rf"^{name} (\S+)$", text, re.M)
        return float(value)

    def wait_idle(self, timeout_s: float = 10.0):
        """Until the engine reports nothing running or waiting and no page in use."""
        deadline = time.monotonic() + timeout_s
        while True:
            s = self.runner.stats
            if s.running == 0 and s.waiting == 0 and s.pages_used == 0:
                return s
            assert time.monotonic() < deadline, f"engine not idle: {s}"
            time.sleep(0.02)


def make_engine(model, max_seqs: int = 16, **kw):
    return SlowEngine(model, max_seqs=max_seqs, max_tokens_per_step=64, progress=False, **kw)


@pytest.fixture(scope="module")
def srv(tiny_model):
    with ThreadServer(make_engine(tiny_model, num_pages=256), tiny_model) as s:
        yield s


@contextlib.contextmanager
def slow_steps(engine, seconds: float):
    engine.step_delay_s = seconds
    try:
        yield
    finally:
        engine.step_delay_s = 0.0


# --- the OpenAI client against jllm.generate --------------------------------------------------

@pytest.mark.parametrize("prompt", PROMPTS[:2])
def test_completions_streamed_and_not_equal_greedy_generate(srv, tiny_model, prompt):
    expected = ref(tiny_model, prompt)
    n_prompt = len(tiny_model.tokenizer.encode(prompt, bos=True))
    c = srv.client()
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0)
    assert r.choices[0].text == expected.text
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, len(expected.tokens))
    assert r.usage.total_tokens == n_prompt + len(expected.tokens)
    chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0,
                                       stream=True, stream_options={"include_usage": True}))
    *content, last = chunks
    assert "".join(ch.choices[0].text for ch in content) == expected.text
    assert [ch.choices[0].finish_reason for ch in content][-1] == expected.finish_reason
    assert all(ch.choices[0].finish_reason is None for ch in content[:-1])
    assert last.choices == [] and last.usage.completion_tokens == len(expected.tokens)
    assert all(ch.usage is None for ch in content)


def test_chat_streamed_and_not_equal_greedy_generate_of_the_llama2_format(srv, tiny_model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids = format_chat(messages, tiny_model.tokenizer)
    expected = ref(tiny_model, ids)
    c = srv.client()
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == expected.text
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == expected.finish_reason
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), len(expected.tokens))
    stream = c.chat.completions.create(model=NAME, messages=messages, max_tokens=N, temperature=0,
                                       stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == expected.finish_reason


def test_chat_logprobs_are_the_greedy_choice_and_its_alternatives(srv, tiny_model):
    messages = [{"role": "user", "content": "Hi there"}]
    expected = ref(tiny_model, format_chat(messages, tiny_model.tokenizer))
    r = srv.client().chat.completions.create(model=NAME, messages=messages, max_tokens=N,
                                             temperature=0, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == len(expected.tokens)
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.top_logprobs[0].token == entry.token          # greedy: the most likely one
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob
        assert entry.logprob <= 0
    # The bytes of the tokens spell the reply (invalid bytes aside: decoders differ in how many
    # U+FFFD they make of them).
    raw = bytes(b for e in content for b in e.bytes).decode("utf-8", "replace")
    assert raw.lstrip().replace("\ufffd", "") == expected.text.lstrip().replace("\ufffd", "")


def test_structured_outputs_parse_as_asked_and_match_the_engine(srv, tiny_model):
    """response_format json_schema / json_object and the guided_regex extension, through the
    official client: the text parses as asked and is what the engine gives the same request."""
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                               "rank": {"type": "integer", "minimum": 1, "maximum": 9}},
              "required": ["city", "rank"], "additionalProperties": False}
    c = srv.client()
    messages = [{"role": "user", "content": "A city and its rank, as JSON"}]
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0, response_format={
        "type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}})
    obj = json.loads(r.choices[0].message.content)
    assert set(obj) == {"city", "rank"} and 1 <= obj["rank"] <= 9 and r.choices[0].finish_reason == "stop"
    engine = Engine(tiny_model, max_seqs=2, num_pages=64, max_tokens_per_step=64, progress=False)
    [out] = engine.generate([format_chat(messages, tiny_model.tokenizer)],
                            SamplingParams(max_tokens=40, guided=Guided.json_schema(schema)))
    assert r.choices[0].message.content == out.text
    stream = c.chat.completions.create(model=NAME, messages=messages, max_tokens=40, temperature=0, stream=True,
                                       response_format={"type": "json_object"})
    text = "".join(ch.choices[0].delta.content or "" for ch in stream)
    assert text.startswith("{")
    r = c.completions.create(model=NAME, prompt="Yes or no?", max_tokens=10, temperature=0.8, seed=3,
                             extra_body={"guided_regex": "(yes|no)!"})
    assert r.choices[0].text in ("yes!", "no!") and r.choices[0].finish_reason == "stop"
    srv.wait_idle()


WEATHER = {"type": "function", "function": {"name": "wx", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "maxLength": 3}}, "required": ["city"],
    "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 9},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 9}},
    "required": ["a", "b"], "additionalProperties": False}}}


def _engine_reply(model, messages, tools, tool_choice, parallel=True, max_tokens=40) -> str:
    """The engine's greedy text for the prompt and grammar a forced tool choice makes."""
    ids = chat_ids(render_messages(messages, tools, False), model.tokenizer, None)
    engine = Engine(model, max_seqs=2, num_pages=64, max_tokens_per_step=64, progress=False)
    [out] = engine.generate([ids], SamplingParams(max_tokens=max_tokens,
                                                  guided=tool_guide(check_tools(tools), tool_choice, parallel)))
    return out.text


def test_forced_tool_calls_come_back_as_tool_calls_streamed_and_not(srv, tiny_model):
    """tool_choice "required" (one call, or several with parallel_tool_calls) and a named function:
    message.tool_calls holds calls whose arguments parse as their tool's schema, exactly the
    engine's guided reply for the same prompt; a stream sends the same calls."""
    c = srv.client()
    messages = [{"role": "user", "content": "Weather in Paris, and 2 + 3?"}]
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=60, temperature=0,
                                  tools=[WEATHER, ADD], tool_choice="required", parallel_tool_calls=False)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_") and call.function.name in ("wx", "add")
    args = json.loads(call.function.arguments)
    assert set(args) == ({"city"} if call.function.name == "wx" else {"a", "b"})
    ref = json.loads(_engine_reply(tiny_model, messages, [WEATHER, ADD], "required", parallel=False, max_tokens=60))
    assert ref == [{"name": call.function.name, "arguments": args}]

    named = {"type": "function", "function": {"name": "add"}}
    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=60, temperature=0,
                                  tools=[WEATHER, ADD], tool_choice=named)
    [call] = r.choices[0].message.tool_calls
    args = json.loads(call.function.arguments)
    assert call.function.name == "add" and 0 <= args["a"] <= 9 and 0 <= args["b"] <= 9
    assert r.choices[0].finish_reason == "stop"   # OpenAI's for a named function ("tool_calls": the model chose)
    assert args == json.loads(_engine_reply(tiny_model, messages, [WEATHER, ADD], named, max_tokens=60))

    r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=60, temperature=0,
                                  tools=[WEATHER, ADD], tool_choice="required")
    chunks = list(c.chat.completions.create(model=NAME, messages=messages, max_tokens=60, temperature=0,
                                            tools=[WEATHER, ADD], tool_choice="required", stream=True))
    streamed = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, tc.function.arguments) for tc in streamed] == \
        [(k, tc.function.name, tc.function.arguments) for k, tc in enumerate(r.choices[0].message.tool_calls)]
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason == "tool_calls"
    srv.wait_idle()


class _Canned(Engine):
    """The engine, but every request's text is `canned` (all in its first output) and a request
    that ends does so with "stop": what a model that answers with a tool call would send."""
    canned = ""

    def step(self):
        outs = []
        for o in super().step():
            first = o.request_id not in self.__dict__.setdefault("_seen", set())
            self._seen.add(o.request_id)
            outs.append(dataclasses.replace(o, text=self.canned if first else "",
                                            finish_reason="stop" if o.finished else None))
        return outs


@pytest.mark.parametrize("canned, calls", [
    ('{"name": "wx", "arguments": {"city": "Rome"}}', [("wx", {"city": "Rome"})]),
    (' [{"name": "add", "parameters": {"a": 1, "b": 2}}, {"name": "wx", "arguments": "{\\"city\\": \\"Oslo\\"}"}]',
     [("add", {"a": 1, "b": 2}), ("wx", {"city": "Oslo"})]),
    ("  Hello there", None),
    ('{"name": "unknown", "arguments": {}}', None),
    ('{"name": "wx", "arguments": {"city": ', None),
    ('{"name": ["wx"], "arguments": {}}', None),
    ("[" + "1" * 5000 + "]", None),
    ("[" * 3000, None),
], ids=["call", "two_calls_parameters_and_text_arguments", "text", "unknown_tool", "cut_json", "name_not_a_string",
        "huge_number", "deep_nesting"])
def test_auto_tool_choice_turns_a_json_call_into_tool_calls_and_streams_text_as_it_comes(tiny_model, canned,
                                                                                         calls):
    """tool_choice "auto" (the default with tools): a reply that is, whole, a JSON call (or list)
    of known tools comes back as tool_calls (finish "tool_calls"), streamed whole; anything else
    is the text, streamed as it comes once it does not open with JSON."""
    engine = _Canned(tiny_model, max_seqs=2, num_pages=64, max_tokens_per_step=64, progress=False)
    engine.canned = canned
    with ThreadServer(engine, tiny_model) as s:
        c = s.client()
        kw = dict(model=NAME, messages=[{"role": "user", "content": "Weather?"}], max_tokens=4, temperature=0,
                  tools=[WEATHER, ADD])
        r = c.chat.completions.create(**kw)
        chunks = list(c.chat.completions.create(**kw, stream=True))
    msg, streamed = r.choices[0].message, [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    if calls is None:
        assert msg.content == canned and not msg.tool_calls and r.choices[0].finish_reason == "stop"
        assert text == canned and not streamed and chunks[-1].choices[0].finish_reason == "stop"
        return
    assert msg.content is None and r.choices[0].finish_reason == "tool_calls"
    assert [(tc.function.name, json.loads(tc.function.arguments)) for tc in msg.tool_calls] == calls
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in streamed] == \
        [(k, n, a) for k, (n, a) in enumerate(calls)]
    assert text == "" and chunks[-1].choices[0].finish_reason == "tool_calls"


def test_auto_tool_choice_keeps_one_call_without_parallel_tool_calls(tiny_model):
    engine = _Canned(tiny_model, max_seqs=2, num_pages=64, max_tokens_per_step=64, progress=False)
    engine.canned = '[{"name": "add", "arguments": {"a": 1, "b": 2}}, {"name": "wx", "arguments": {"city": "x"}}]'
    with ThreadServer(engine, tiny_model) as s:
        r = s.client().chat.completions.create(model=NAME, messages=[{"role": "user", "content": "?"}], max_tokens=4,
                                               tools=[WEATHER, ADD], parallel_tool_calls=False)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "add" and r.choices[0].finish_reason == "tool_calls"


def test_earlier_tool_calls_with_arguments_past_the_json_parser_are_not_a_500(srv):
    for arguments in ("1" * 5000, "[" * 3000, "not json"):
        messages = [{"role": "user", "content": "?"},
                    {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "c", "type": "function", "function": {"name": "wx", "arguments": arguments}}]},
                    {"role": "tool", "tool_call_id": "c", "content": "ok"}]
        r = httpx.post(f"{srv.url}/v1/chat/completions", json=dict(
            model=NAME, messages=messages, max_tokens=2, temperature=0, tools=[WEATHER], tool_choice="none"), timeout=30)
        # The long ones are past the tiny model's context (a 400 saying so); none is a server error.
        assert r.status_code == (200 if arguments == "not json" else 400), r.text
        assert "context" in r.text or r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_conversation_with_tool_results_renders_and_answers(srv, tiny_model):
    """The turn after a call: the assistant's tool_calls and the tool's result go back to the
    model (Llama-2's format: the call as JSON, the result as a user turn); tool_choice "none"."""
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function",
                     "function": {"name": "wx", "arguments": '{"city": "Paris"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}]
    r = srv.client().chat.completions.create(model=NAME, messages=messages, max_tokens=8, temperature=0,
                                             tools=[WEATHER], tool_choice="none")
    rendered = render_messages([{**m, "content": m["content"] or ""} for m in messages], None, False)
    assert [m["role"] for m in rendered] == ["user", "assistant", "user"]
    assert '"city": "Paris"' in rendered[1]["content"] and "sunny, 21 C" in rendered[2]["content"]
    ids = chat_ids(rendered, tiny_model.tokenizer, None)
    assert r.usage.prompt_tokens == len(ids)
    assert r.choices[0].message.content == ref(tiny_model, ids, 8).text


def test_a_template_that_reads_tools_gets_them_with_special_tokens_kept_as_text(tokenizer):
    source = ("{% if tools %}TOOLS {{ tools | map(attribute='function') | map(attribute='name') | join(',') }} "
              "{{ tools[0].function.description }}\n{% endif %}"
              "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    t = ChatTemplate(source, tokenizer)
    assert t.takes_tools and not ChatTemplate(CHATML_TEMPLATE, tokenizer).takes_tools
    assert not ChatTemplate("{# no tools here #}{{ messages[0]['content'] }}{{ tools_in_user_message }}",
                            tokenizer).takes_tools   # a comment or another variable is not `tools`
    tools = check_tools([{**WEATHER, "function": {**WEATHER["function"], "description": "ends with </s> here"}}, ADD])
    ids = chat_ids([{"role": "user", "content": "hi"}], tokenizer, t, tools)
    assert tokenizer.decode(ids).startswith("TOOLS wx,add ends with")
    assert tokenizer.eos_id not in ids      # typed in a tool's description, it stays text
    as_json = ChatTemplate("{{ tools | tojson }}{{ messages[0]['content'] }}", tokenizer)
    named = check_tools([{"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"</s>": {"type": "string"}}}}}])
    assert tokenizer.eos_id not in chat_ids([{"role": "user", "content": "hi"}], tokenizer, as_json, named)


def test_required_tools_whose_parameters_use_defs_and_refs(tiny_model):
    """Tool schemas with their own $defs (pydantic's nested models) and #/definitions refs combine
    into one "required" grammar; every output names a tool and follows its schema."""
    mk = {"type": "function", "function": {"name": "mk", "parameters": {
        "type": "object", "properties": {"p": {"$ref": "#/$defs/P"}}, "required": ["p"], "additionalProperties": False,
        "$defs": {"P": {"type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 9}},
                        "required": ["x"], "additionalProperties": False}}}}}
    flag = {"type": "function", "function": {"name": "flag", "parameters": {
        "type": "object", "properties": {"q": {"$ref": "#/definitions/Q"}}, "required": ["q"],
        "additionalProperties": False, "definitions": {"Q": {"type": "boolean"}}}}}
    # Pointers past $defs, a nested $defs, "#" itself, a property named like a keyword, an $id,
    # and a const holding a "$defs" key: each stays what it meant inside its own tool.
    odd = {"type": "function", "function": {"name": "odd", "parameters": {
        "$id": "http://example.com/odd", "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object", "additionalProperties": False, "required": ["definitions", "k", "same"],
        "properties": {"definitions": {"type": "integer", "minimum": 0, "maximum": 5},
                       "k": {"$ref": "#/properties/inner/$defs/B"},
                       "same": {"$ref": "#/properties/definitions"},
                       "inner": {"$defs": {"B": {"const": {"$defs": 1}}}}}}}}
    guided = tool_guide(check_tools([odd]), "required", False)
    engine = Engine(tiny_model, max_seqs=4, num_pages=64, max_tokens_per_step=64, progress=False)
    [out] = engine.generate([[1, 30]], [SamplingParams(max_tokens=120, guided=guided)])
    [call] = json.loads(out.text)
    assert call["name"] == "odd" and call["arguments"]["k"] == {"$defs": 1}
    assert isinstance(call["arguments"]["definitions"], int) and isinstance(call["arguments"]["same"], int)
    guided = tool_guide(check_tools([mk, flag]), "required", False)
    engine = Engine(tiny_model, max_seqs=4, num_pages=64, max_tokens_per_step=64, progress=False)
    outs = engine.generate([[1, 20 + i] for i in range(4)], [SamplingParams(max_tokens=60, temperature=1.0, seed=i,
                                                                            guided=guided) for i in range(4)])
    for out in outs:
        [call] = json.loads(out.text)
        assert (call["name"], set(call["arguments"])) in (("mk", {"p"}), ("flag", {"q"})), out.text
        if call["name"] == "mk":
            assert set(call["arguments"]["p"]) == {"x"} and 0 <= call["arguments"]["p"]["x"] <= 9
        else:
            assert isinstance(call["arguments"]["q"], bool)


def test_completion_from_token_ids_with_logprobs(srv, tiny_model):
    ids = tiny_model.tokenizer.encode("Return the value", bos=True)
    expected = ref(tiny_model, ids)
    r = srv.client().completions.create(model=NAME, prompt=ids, max_tokens=N, temperature=0, logprobs=2)
    assert r.choices[0].text == expected.text
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(expected.tokens)
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        assert chosen == pytest.approx(max(top.values()))
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)


def test_stop_strings_cut_the_text_like_generate(srv, tiny_model):
    prompt = PROMPTS[1]
    full = ref(tiny_model, prompt).text
    stop = full[6:9]
    assert stop.strip() and full.find(stop) >= 6
    expected = ref(tiny_model, prompt, stop=[stop])
    assert expected.finish_reason == "stop"
    c = srv.client()
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0, stop=stop)
    assert (r.choices[0].text, r.choices[0].finish_reason) == (expected.text, "stop")
    assert r.usage.completion_tokens == len(expected.tokens)
    chunks = list(c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0,
                                       stop=[stop, "zzzz"], stream=True))
    assert "".join(ch.choices[0].text for ch in chunks) == expected.text
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_min_p_reaches_the_sampler(srv, tiny_model):
    """min_p (an extension, as in vLLM) = 1 keeps only the most likely token: greedy text at any
    temperature."""
    r = srv.client().completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=N, temperature=2.0, seed=1,
                                        extra_body={"min_p": 1.0})
    assert r.choices[0].text == ref(tiny_model, PROMPTS[0]).text


def test_penalties_are_generates(srv, tiny_model):
    messages = [{"role": "user", "content": "Hi there"}]
    ids = format_chat(messages, tiny_model.tokenizer)
    c = srv.client()
    for kw in (dict(temperature=0, frequency_penalty=1.5), dict(temperature=1.0, seed=3, presence_penalty=-0.5,
                                                               frequency_penalty=0.7),
               dict(temperature=0, repetition_penalty=1.6)):
        rep = {"repetition_penalty": kw.pop("repetition_penalty")} if "repetition_penalty" in kw else {}
        expected = ref(tiny_model, ids, **kw, **rep)
        r = c.chat.completions.create(model=NAME, messages=messages, max_tokens=N, extra_body=rep, **kw)
        assert r.choices[0].message.content == expected.text, kw
    prompt = [1, 5, 9, 5]   # the tiny model repeats itself after these
    plain = ref(tiny_model, prompt, stop_token_ids=[])
    penalized = ref(tiny_model, prompt, stop_token_ids=[], frequency_penalty=2.0)
    assert len(set(plain.tokens)) < N and penalized.tokens != plain.tokens
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0, frequency_penalty=2.0,
                             extra_body={"ignore_eos": True})
    assert r.choices[0].text == penalized.text
    repeated = ref(tiny_model, prompt, stop_token_ids=[], repetition_penalty=2.0)
    assert repeated.tokens != plain.tokens
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0,
                             extra_body={"ignore_eos": True, "repetition_penalty": 2.0})
    assert r.choices[0].text == repeated.text
    bias = {plain.tokens[0]: -100.0, 7: 3.0}
    biased = ref(tiny_model, prompt, stop_token_ids=[], logit_bias=bias)
    assert biased.tokens != plain.tokens and plain.tokens[0] not in biased.tokens
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0,
                             logit_bias={str(t): b for t, b in bias.items()}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == biased.text


# --- echo and prompt logprobs (scoring, as lm-eval's loglikelihood tasks ask) ---------------------

@pytest.fixture(scope="module")
def srv_plp(tiny_model):
    with ThreadServer(make_engine(tiny_model, num_pages=256, prompt_logprobs=True), tiny_model) as s:
        yield s


def _log_softmax_after_each(model, ids):
    """[len(ids), V] log-probabilities after each token, from one float32 forward."""
    import jax
    import numpy as np
    from jllm.model import forward, init_cache
    lg, _ = forward(model.params, np.asarray([ids], np.int32), init_cache(model.cfg, 1, len(ids), np.float32),
                    model.cfg)
    return np.asarray(jax.nn.log_softmax(lg[0], axis=-1))


def test_echo_returns_the_prompt_then_the_completion(srv, tiny_model):
    prompt = PROMPTS[0]
    expected = ref(tiny_model, prompt)
    c = srv.client()
    r = c.completions.create(model=NAME, prompt=prompt, max_tokens=N, temperature=0, echo=True)
    assert r.choices[0].text == prompt + expected.text
    ids = tiny_model.tokenizer.encode(prompt, bos=True)
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=N, temperature=0, echo=True, stream=True)
    assert "".join(ch.choices[0].text for ch in r) == tiny_model.tokenizer.decode(ids) + expected.text


def test_echoed_text_offsets_point_into_the_echoed_text(srv_plp, tiny_model):
    """text[text_offset[i]:] starts with token i's text (the first word's space aside: the text
    starts without it), for a string prompt with non-ASCII text and for token ids; the
    completion's offsets start at the end of the echoed prompt."""
    c = srv_plp.client()
    prompt = "Grüße, naïve café with more words"
    ids = tiny_model.tokenizer.encode(prompt, bos=True)
    for sent in (prompt, ids):
        r = c.completions.create(model=NAME, prompt=sent, max_tokens=3, temperature=0, echo=True, logprobs=1,
                                 extra_body={"ignore_eos": True})
        text, lp = r.choices[0].text, r.choices[0].logprobs
        echoed = prompt if isinstance(sent, str) else tiny_model.tokenizer.decode(ids)
        assert text.startswith(echoed) and lp.text_offset == sorted(lp.text_offset)
        for tok, off in zip(lp.tokens[:len(ids)], lp.text_offset):
            piece = tok if off else tok.lstrip(" ")
            if piece and not tok.startswith("bytes:") and tok != "<s>":
                assert text[off:].startswith(piece), (tok, off, text)
        assert lp.text_offset[len(ids)] == len(echoed)


def test_completion_text_offsets_stay_in_the_text_past_byte_pieces(srv, tiny_model):
    """Offsets advance by what each token adds to the text (a byte piece's `bytes:\\xNN` is not
    text), so each one points into the text, streamed or not."""
    sp = tiny_model.tokenizer.sp
    byte = next(i for i in range(sp.vocab_size()) if sp.is_byte(i) and sp.id_to_piece(i) == "<0x41>")  # "A"
    kw = dict(model=NAME, prompt=PROMPTS[0], max_tokens=6, temperature=0, logprobs=1, logit_bias={str(byte): 100},
              extra_body={"ignore_eos": True})
    c = srv.client()
    r = c.completions.create(**kw)
    text, lp = r.choices[0].text, r.choices[0].logprobs
    assert text == "AAAAAA" and lp.tokens == ["bytes:\\x41"] * 6
    assert lp.text_offset == [0, 1, 2, 3, 4, 5]
    chunks = list(c.completions.create(stream=True, **kw))
    assert [o for ch in chunks if ch.choices[0].logprobs for o in ch.choices[0].logprobs.text_offset] == lp.text_offset


def test_token_text_of_an_id_past_the_tokenizer(tokenizer):
    from jllm.serve.responses import token_text
    assert token_text(tokenizer, tokenizer.vocab_size + 3) == (f"token_id:{tokenizer.vocab_size + 3}", [])


def test_echo_with_logprobs_scores_the_prompt_as_the_model_does(srv_plp, tiny_model):
    """max_tokens=0, echo, logprobs: what a loglikelihood evaluation sends. The first token has
    no logprob; each other is the model's log-softmax after the tokens before it, with its top
    alternatives; nothing is generated. With max_tokens > 0, the completion's logprobs follow."""
    ids = tiny_model.tokenizer.encode(PROMPTS[1], bos=True)
    ref_lp = _log_softmax_after_each(tiny_model, ids)
    c = srv_plp.client()
    r = c.completions.create(model=NAME, prompt=ids, max_tokens=0, temperature=0, echo=True, logprobs=2)
    ch = r.choices[0]
    assert ch.finish_reason == "length" and r.usage.completion_tokens == 0 and r.usage.prompt_tokens == len(ids)
    lp = ch.logprobs
    assert len(lp.tokens) == len(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(ref_lp[i - 1, ids[i]], abs=1e-4)
        assert len(lp.top_logprobs[i]) <= 2
        assert max(lp.top_logprobs[i].values()) == pytest.approx(ref_lp[i - 1].max(), abs=1e-4)
    assert ch.text == tiny_model.tokenizer.decode(ids)
    # A completion after the echo: its logprobs follow the prompt's; streamed, the same entries.
    expected = ref(tiny_model, ids, max_tokens=4)
    kw = dict(model=NAME, prompt=ids, max_tokens=4, temperature=0, echo=True, logprobs=1)
    r = c.completions.create(**kw)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + len(expected.tokens)
    assert lp.token_logprobs[1:len(ids)] == pytest.approx([ref_lp[i - 1, ids[i]] for i in range(1, len(ids))], abs=1e-4)
    assert r.choices[0].text == tiny_model.tokenizer.decode(ids) + expected.text
    assert lp.text_offset == sorted(lp.text_offset)
    chunks = list(c.completions.create(stream=True, **kw))
    streamed = [t for ch in chunks if ch.choices[0].logprobs for t in ch.choices[0].logprobs.token_logprobs]
    assert streamed == lp.token_logprobs
    assert sum(len(ch.choices[0].logprobs.tokens) for ch in chunks if ch.choices[0].logprobs) == len(lp.tokens)
    srv_plp.wait_idle()


# --- several choices: n, and a batch of prompts ------------------------------------------------

def _by_index(chunks, field):
    """Streamed chunks -> {choice index: concatenated text, finish reasons}."""
    texts, finishes = {}, {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + (field(c) or "")
            if c.finish_reason is not None:
                finishes.setdefault(c.index, []).append(c.finish_reason)
    return texts, finishes


def test_n_choices_of_a_prompt_batch_are_generate_with_seed_plus_their_index(srv, tiny_model):
    """OpenAI numbers prompt i's n choices i*n ... i*n+n-1; choice j samples as generate with
    seed + j; usage counts each prompt once and every choice's output; streaming gives the same
    texts, each choice finishing once, then the usage."""
    prompts, n, seed = PROMPTS[:2], 2, 11
    expected = [ref(tiny_model, prompts[j // n], temperature=1.0, seed=seed + j) for j in range(len(prompts) * n)]
    c = srv.client()
    kw = dict(model=NAME, prompt=prompts, n=n, max_tokens=N, temperature=1.0, seed=seed)
    r = c.completions.create(**kw)
    assert [ch.index for ch in r.choices] == list(range(4))
    assert [(ch.text, ch.finish_reason) for ch in r.choices] == [(e.text, e.finish_reason) for e in expected]
    assert r.choices[0].text != r.choices[1].text   # two samples of one prompt
    n_prompt = sum(len(tiny_model.tokenizer.encode(p, bos=True)) for p in prompts)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, sum(len(e.tokens) for e in expected))
    *content, last = list(c.completions.create(stream=True, stream_options={"include_usage": True}, **kw))
    texts, finishes = _by_index(content, lambda ch: ch.text)
    assert texts == {j: e.text for j, e in enumerate(expected)}
    assert finishes == {j: [e.finish_reason] for j, e in enumerate(expected)}
    assert last.choices == [] and last.usage == r.usage
    srv.wait_idle()


def test_chat_n_choices_stream_a_role_each_and_match_generate(srv, tiny_model):
    messages = [{"role": "user", "content": "Hi there"}]
    ids = format_chat(messages, tiny_model.tokenizer)
    expected = [ref(tiny_model, ids, temperature=0.8, top_k=20, seed=4 + j) for j in range(3)]
    c = srv.client()
    kw = dict(model=NAME, messages=messages, n=3, max_tokens=N, temperature=0.8, seed=4,
              extra_body={"top_k": 20})
    r = c.chat.completions.create(**kw)
    assert [(ch.index, ch.message.content, ch.finish_reason) for ch in r.choices] == \
        [(j, e.text, e.finish_reason) for j, e in enumerate(expected)]
    assert r.usage.prompt_tokens == len(ids)
    chunks = list(c.chat.completions.create(stream=True, **kw))
    roles = [ch.choices[0].index for ch in chunks if ch.choices[0].delta.role == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    texts, finishes = _by_index(chunks, lambda ch: ch.delta.content)
    assert texts == {j: e.text for j, e in enumerate(expected)}
    assert all(len(f) == 1 for f in finishes.values()) and len(finishes) == 3


def _leave_after_the_first_chunk(srv, body: dict, while_open=lambda: None):
    """Stream a completion, read up to its first data chunk, call while_open(), then close."""
    with httpx.Client(timeout=30) as client:
        with client.stream("POST", f"{srv.url}/v1/completions", json={**body, "stream": True}) as response:
            assert response.status_code == 200
            lines = response.iter_lines()
            while not next(lines).startswith("data: {"):
                pass
            return while_open()


def test_a_client_leaving_a_request_of_several_choices_aborts_them_all(srv):
    aborted = srv.metric("jllm_requests_aborted_total")
    with slow_steps(srv.engine, 0.05):
        _leave_after_the_first_chunk(srv, {"model": NAME, "prompt": PROMPTS[2:4], "n": 2, "max_tokens": N,
                                           "temperature": 0, "ignore_eos": True})
        srv.wait_idle(timeout_s=5)
        assert srv.metric("jllm_requests_aborted_total") == aborted + 4


def test_choices_the_queue_cannot_take_are_refused_together_and_none_is_queued(tiny_model):
    """More choices than --max-queue: a 400 (a 429 would be retried forever). With one request
    running and one waiting in a queue of 2, two more choices get a 429 and neither is queued."""
    engine = make_engine(tiny_model, max_seqs=1, max_queue=2, num_pages=64)
    with ThreadServer(engine, tiny_model) as s:
        url = f"{s.url}/v1/completions"
        r = httpx.post(url, json={"model": NAME, "prompt": "Hi", "n": 3, "max_tokens": N}, timeout=30)
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        body = {"model": NAME, "prompt": "Hi", "max_tokens": N, "temperature": 0, "ignore_eos": True}

        async def main():
            async with httpx.AsyncClient(timeout=60) as client:
                with slow_steps(engine, 0.05):
                    first = [asyncio.ensure_future(client.post(url, json=body)) for _ in range(2)]
                    for _ in range(500):
                        if (s.runner.stats.running, s.runner.stats.waiting) == (1, 1):
                            break
                        await asyncio.sleep(0.01)
                    refused = await client.post(url, json={**body, "n": 2})
                    waiting = s.runner.stats.waiting
                return refused, waiting, await asyncio.gather(*first)

        refused, waiting, first = asyncio.run(main())
        assert refused.status_code == 429 and refused.json()["error"]["code"] == "queue_full"
        assert waiting == 1 and [r.status_code for r in first] == [200, 200]
        s.wait_idle()
        assert s.metric("jllm_requests_aborted_total") == 0
        ok = s.client().completions.create(model=NAME, prompt="Hi", n=2, max_tokens=N, temperature=0)
        assert ok.choices[0].text == ok.choices[1].text == ref(tiny_model, "Hi").text


# --- concurrency, cancellation ---------------------------------------------------------------

def test_64_concurrent_clients_half_streaming_all_correct_then_no_page_in_use(srv, tiny_model):
    prompts = [f"{PROMPTS[i % 4]} {i}" for i in range(64)]
    expected = [ref(tiny_model, p) for p in prompts]

    async def one(client, i):
        kw = dict(model=NAME, prompt=prompts[i], max_tokens=N, temperature=0)
        if i % 2:
            stream = await client.completions.create(stream=True, **kw)
            return "".join([ch.choices[0].text async for ch in stream])
        return (await client.completions.create(**kw)).choices[0].text

    async def main():
        async with openai.AsyncOpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0,
                                      timeout=120) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    texts = asyncio.run(main())
    assert texts == [e.text for e in expected]
    srv.wait_idle()
    assert srv.metric("jllm_kv_cache_pages_used") == 0
    assert srv.metric("jllm_requests_running") == 0


def test_client_disconnect_mid_stream_aborts_and_frees_pages(srv, tiny_model):
    aborted = srv.metric("jllm_requests_aborted_total")
    with slow_steps(srv.engine, 0.05):
        def running():
            assert srv.runner.stats.running == 1
            return srv.runner.stats.generated_tokens

        # The connection is closed on return, long before the 16 tokens are out.
        generated = _leave_after_the_first_chunk(srv, {"model": NAME, "prompt": PROMPTS[2], "max_tokens": N,
                                                       "temperature": 0, "ignore_eos": True}, running)
        stats = srv.wait_idle(timeout_s=5)
        assert srv.metric("jllm_requests_running") == 0
        assert srv.metric("jllm_requests_aborted_total") == aborted + 1
        # Aborted within about one step: at most the step in flight and the next one ran.
        assert stats.generated_tokens - generated <= 3
    r = srv.client().completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=N, temperature=0)
    assert r.choices[0].text == ref(tiny_model, PROMPTS[0]).text


def test_non_streaming_client_that_disconnects_is_aborted(srv):
    aborted = srv.metric("jllm_requests_aborted_total")
    with slow_steps(srv.engine, 0.05):
        body = {"model": NAME, "prompt": PROMPTS[3], "max_tokens": N, "temperature": 0,
                "ignore_eos": True}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{srv.url}/v1/completions", json=body, timeout=0.3)
        srv.wait_idle(timeout_s=5)
        assert srv.metric("jllm_requests_aborted_total") == aborted + 1


# --- bad input ---------------------------------------------------------------------------------

def _json(obj) -> bytes:
    return json.dumps(obj).encode()


OK = {"model": NAME, "prompt": "Hello", "max_tokens": 4}
CHAT = {"model": NAME, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
BAD = [  # id, endpoint, body, status, param
    ("malformed_json", "completions", b'{"model": "tiny", "prompt": ', 400, None),
    ("not_an_object", "completions", b"[1, 2]", 400, None),
    ("empty_body", "completions", b"", 400, None),
    ("nan_literal", "completions", b'{"model": "tiny", "prompt": "a", "temperature": NaN}', 400, None),
    ("non_utf8_body", "completions", b'{"model": "tiny", "prompt": "\xff\xfe"}', 400, None),
    ("missing_model", "completions", _json({"prompt": "Hello"}), 400, "model"),
    ("missing_prompt", "completions", _json({"model": NAME}), 400, "prompt"),
    ("model_not_a_string", "completions", _json({**OK, "model": 7}), 400, "model"),
    ("max_tokens_string", "completions", _json({**OK, "max_tokens": "ten"}), 400, "max_tokens"),
    ("max_tokens_float", "completions", _json({**OK, "max_tokens": 4.5}), 400, "max_tokens"),
    ("temperature_string", "completions", _json({**OK, "temperature": "hot"}), 400, "temperature"),
    ("stream_string", "completions", _json({**OK, "stream": "yes"}), 400, "stream"),
    ("prompt_number", "completions", _json({**OK, "prompt": 5}), 400, "prompt"),
    ("prompt_mixed_list", "completions", _json({**OK, "prompt": [1, "a"]}), 400, "prompt"),
    ("stop_number", "completions", _json({**OK, "stop": 3}), 400, "stop"),
    ("negative_max_tokens", "completions", _json({**OK, "max_tokens": -1}), 400, "max_tokens"),
    ("zero_max_tokens", "completions", _json({**OK, "max_tokens": 0}), 400, "max_tokens"),
    ("huge_max_tokens", "completions", _json({**OK, "max_tokens": 10 ** 9}), 400, "max_tokens"),
    ("negative_temperature", "completions", _json({**OK, "temperature": -0.5}), 400, "temperature"),
    ("top_p_zero", "completions", _json({**OK, "top_p": 0}), 400, "top_p"),
    ("top_p_above_one", "completions", _json({**OK, "top_p": 1.5}), 400, "top_p"),
    ("top_k_zero", "completions", _json({**OK, "top_k": 0}), 400, "top_k"),
    ("empty_prompt", "completions", _json({**OK, "prompt": ""}), 400, "prompt"),
    ("empty_token_list", "completions", _json({**OK, "prompt": []}), 400, "prompt"),
    ("token_id_out_of_vocab", "completions", _json({**OK, "prompt": [1, 99999]}), 400, "prompt"),
    ("prompt_over_context", "completions", _json({**OK, "prompt": "word " * 600}), 400, "prompt"),
    ("prompt_plus_max_tokens_over_context", "completions",
     _json({**OK, "prompt": list(range(3, 503)), "max_tokens": 20}), 400, "max_tokens"),
    ("unknown_model", "completions", _json({**OK, "model": "gpt-4"}), 404, "model"),
    ("max_tokens_zero_without_echo", "completions", _json({**OK, "max_tokens": 0}), 400, "max_tokens"),
    ("echo_logprobs_without_prompt_logprobs", "completions", _json({**OK, "echo": True, "logprobs": 1}), 400, "echo"),
    ("chat_max_tokens_zero", "chat/completions", _json({**CHAT, "max_tokens": 0}), 400, "max_tokens"),
    ("n_too_many", "completions", _json({**OK, "n": 65}), 400, "n"),
    ("n_zero", "completions", _json({**OK, "n": 0}), 400, "n"),
    ("best_of_not_n", "completions", _json({**OK, "n": 2, "best_of": 3}), 400, "best_of"),
    ("prompts_times_n_too_many", "completions", _json({**OK, "prompt": ["a", "b"], "n": 33}), 400, "n"),
    ("prompt_batch_too_large", "completions", _json({**OK, "prompt": ["a"] * 65}), 400, "prompt"),
    ("prompt_batch_with_an_empty_prompt", "completions", _json({**OK, "prompt": ["a", ""]}), 400, "prompt"),
    ("prompt_batch_with_an_empty_id_list", "completions", _json({**OK, "prompt": [[1], []]}), 400, "prompt"),
    ("prompt_batch_one_over_context", "completions", _json({**OK, "prompt": ["a", "word " * 600]}), 400, "prompt"),
    ("prompt_batch_id_out_of_vocab", "completions", _json({**OK, "prompt": [[1], [2, 99999]]}), 400, "prompt"),
    ("logprobs_too_many", "completions", _json({**OK, "logprobs": 50}), 400, "logprobs"),
    ("presence_penalty_too_large", "completions", _json({**OK, "presence_penalty": 2.5}), 400, "presence_penalty"),
    ("frequency_penalty_string", "chat/completions", _json({**CHAT, "frequency_penalty": "1"}), 400, "frequency_penalty"),
    ("repetition_penalty_zero", "completions", _json({**OK, "repetition_penalty": 0}), 400, "repetition_penalty"),
    ("repetition_penalty_huge", "completions", _json({**OK, "repetition_penalty": 1e39}), 400, "repetition_penalty"),
    ("logit_bias_duplicate_id", "completions", _json({**OK, "logit_bias": {"5": 1, "05": -1}}), 400, "logit_bias"),
    ("logit_bias_not_an_object", "completions", _json({**OK, "logit_bias": [1]}), 400, "logit_bias"),
    ("logit_bias_key_not_an_id", "chat/completions", _json({**CHAT, "logit_bias": {"x": 1}}), 400, "logit_bias"),
    ("logit_bias_too_large", "completions", _json({**OK, "logit_bias": {"5": 101}}), 400, "logit_bias"),
    ("logit_bias_past_vocab", "completions", _json({**OK, "logit_bias": {"99999": 1}}), 400, "logit_bias"),
    ("logit_bias_too_many", "completions", _json({**OK, "logit_bias": {str(i): 1 for i in range(301)}}), 400,
     "logit_bias"),
    ("stream_options_without_stream", "completions",
     _json({**OK, "stream_options": {"include_usage": True}}), 400, "stream_options"),
    ("chat_missing_messages", "chat/completions", _json({"model": NAME}), 400, "messages"),
    ("chat_empty_messages", "chat/completions", _json({**CHAT, "messages": []}), 400, "messages"),
    ("chat_messages_string", "chat/completions", _json({**CHAT, "messages": "hi"}), 400, "messages"),
    ("chat_bad_role", "chat/completions",
     _json({**CHAT, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages[0].role"),
    ("chat_roles_out_of_order", "chat/completions",
     _json({**CHAT, "messages": [{"role": "assistant", "content": "x"}]}), 400, "messages"),
    ("chat_image_part", "chat/completions", _json({**CHAT, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}), 400, "messages[0].content"),
    ("chat_n_too_many", "chat/completions", _json({**CHAT, "n": 100}), 400, "n"),
    ("chat_top_logprobs_without_logprobs", "chat/completions",
     _json({**CHAT, "top_logprobs": 2}), 400, "top_logprobs"),
    ("chat_unknown_model", "chat/completions", _json({**CHAT, "model": "x"}), 404, "model"),
    ("chat_huge_max_tokens", "chat/completions", _json({**CHAT, "max_tokens": 10 ** 6}), 400, "max_tokens"),
    ("prompt_lone_surrogate", "completions", _json({**OK, "prompt": "abc\udfff"}), 400, "prompt"),
    ("deeply_nested_json", "completions", b"[" * 100_000 + b"]" * 100_000, 400, None),
    ("long_prompt_over_context", "completions", _json({**OK, "prompt": "word " * 5000}), 400, "prompt"),
    ("long_prompt_lone_surrogate", "completions", _json({**OK, "prompt": "x" * 20_000 + "\udfff"}), 400, "prompt"),
    ("response_format_unknown_type", "chat/completions", _json({**CHAT, "response_format": {"type": "xml"}}), 400,
     "response_format"),
    ("response_format_schema_missing", "chat/completions",
     _json({**CHAT, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}), 400, "response_format"),
    ("response_format_invalid_schema", "completions",
     _json({**OK, "response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "nonsense"}}}}), 400,
     None),
    ("guided_regex_invalid", "completions", _json({**OK, "guided_regex": "(ab"}), 400, None),
    ("tool_choice_unknown_function", "chat/completions", _json({**CHAT, "tools": [WEATHER], "tool_choice": {
        "type": "function", "function": {"name": "nope"}}}), 400, "tool_choice"),
    ("tool_choice_without_tools", "chat/completions", _json({**CHAT, "tool_choice": "required"}), 400, "tool_choice"),
    ("tool_choice_bad_value", "chat/completions", _json({**CHAT, "tools": [WEATHER], "tool_choice": "maybe"}), 400,
     "tool_choice"),
    ("tools_not_functions", "chat/completions", _json({**CHAT, "tools": [{"type": "web"}]}), 400, "tools"),
    ("tools_bad_name", "chat/completions", _json({**CHAT, "tools": [{"type": "function", "function": {
        "name": "has space"}}]}), 400, "tools"),
    ("tool_calls_malformed", "chat/completions", _json({**CHAT, "messages": [
        {"role": "assistant", "tool_calls": "x"}]}), 400, "messages[0].tool_calls"),
    ("forced_tools_with_response_format", "chat/completions", _json({**CHAT, "tools": [WEATHER],
        "tool_choice": "required", "response_format": {"type": "json_object"}}), 400, "response_format"),
    ("min_p_above_one", "completions", _json({**OK, "min_p": 1.5}), 400, "min_p"),
    ("two_output_constraints", "chat/completions",
     _json({**CHAT, "response_format": {"type": "json_object"}, "guided_regex": "a+"}), 400, "guided_regex"),
]


@pytest.mark.parametrize("endpoint,body,status,param", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_input_gets_an_openai_error(srv, endpoint, body, status, param):
    r = httpx.post(f"{srv.url}/v1/{endpoint}", content=body,
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["message"]
    assert error["param"] == param
    assert "Traceback" not in r.text and "File \"" not in r.text
    if status == 404:
        assert error["code"] == "model_not_found"


def test_unknown_route_and_method_get_openai_errors(srv):
    r = httpx.get(f"{srv.url}/v1/nothing", timeout=10)
    assert r.status_code == 404 and "/v1/nothing" in r.json()["error"]["message"]
    r = httpx.get(f"{srv.url}/v1/completions", timeout=10)
    assert r.status_code == 405 and r.json()["error"]["type"] == "invalid_request_error"


def test_openai_client_raises_its_own_error_types(srv):
    c = srv.client()
    with pytest.raises(openai.NotFoundError):
        c.completions.create(model="nope", prompt="Hi", max_tokens=2)
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        c.completions.create(model=NAME, prompt="Hi", max_tokens=100000)


# --- models, health, metrics -------------------------------------------------------------------

def test_models_health_and_metrics(srv):
    c = srv.client()
    c.completions.create(model=NAME, prompt=PROMPTS[0], max_tokens=N, temperature=0)  # counted below
    assert [m.id for m in c.models.list().data] == [NAME]
    assert c.models.retrieve(NAME).id == NAME
    assert httpx.get(f"{srv.url}/health", timeout=10).json() == {"status": "ok"}
    text = httpx.get(f"{srv.url}/metrics", timeout=10).text
    for name in ("jllm_requests_running", "jllm_requests_waiting", "jllm_requests_aborted_total",
                 "jllm_kv_cache_usage_ratio", "jllm_prefix_cache_hit_ratio",
                 "jllm_prompt_tokens_total", "jllm_generation_tokens_total",
                 "jllm_time_to_first_token_seconds_bucket", "jllm_inter_token_latency_seconds_bucket",
                 "jllm_request_latency_seconds_bucket"):
        assert re.search(rf"^{name}[{{ ]", text, re.M), name
    assert srv.metric("jllm_time_to_first_token_seconds_count") >= 1
    assert srv.metric("jllm_generation_tokens_total") >= N


class FailingEngine(SlowEngine):
    fail = False

    def step(self):
        if self.fail:
            raise RuntimeError("device lost")
        return super().step()


def test_an_engine_failure_answers_503_and_health_says_so(tiny_model):
    engine = FailingEngine(tiny_model, max_seqs=16, max_tokens_per_step=64, num_pages=64, progress=False)
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0}
    with ThreadServer(engine, tiny_model) as s:
        assert httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).status_code == 200
        engine.step_delay_s = 0.02
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            engine.fail = True          # mid-stream: an error event, then [DONE]
            events = [x for x in lines if x]
        assert json.loads(events[-2][6:])["error"]["message"].endswith("device lost')")
        assert events[-1] == "data: [DONE]"
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60)
        assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable_error"
        assert "device lost" in r.json()["error"]["message"] and "Traceback" not in r.text
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            assert r.status_code == 503   # refused up front: the engine thread is gone
        assert httpx.get(f"{s.url}/health", timeout=10).status_code == 503


class DyingEngine(SlowEngine):
    """Fails at the end of a step's delay: requests that arrive during that step are queued."""
    fail = False

    def step(self):
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        if self.fail:
            raise RuntimeError("device lost")
        return super(SlowEngine, self).step()


def test_a_request_queued_when_the_engine_fails_is_answered_503_not_left_waiting(tiny_model):
    engine = DyingEngine(tiny_model, max_seqs=16, max_tokens_per_step=64, num_pages=64, progress=False)
    body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}
    with ThreadServer(engine, tiny_model) as s:
        engine.step_delay_s = 0.3
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True}, timeout=60) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            engine.fail = True                      # the step under way fails after its delay
            t = time.monotonic()
            late = httpx.post(f"{s.url}/v1/completions", json={**body, "max_tokens": 4}, timeout=20)
            assert late.status_code == 503 and "device lost" in late.json()["error"]["message"]
            assert time.monotonic() - t < 10
            assert [x for x in lines if x][-1] == "data: [DONE]"


def test_a_pool_smaller_than_the_context_bounds_the_default_output_not_the_request(tiny_model):
    """16 pages of 16 tokens hold 256 of the model's 512 positions: the server's context is 256.
    A chat request without max_tokens is answered (its output capped there), /v1/models says
    256, and an explicit max_tokens past it is a 400 naming max_tokens."""
    with ThreadServer(make_engine(tiny_model, num_pages=16), tiny_model) as s:
        assert httpx.get(f"{s.url}/v1/models", timeout=10).json()["data"][0]["max_model_len"] == 256
        chat = {"model": NAME, "messages": [{"role": "user", "content": PROMPTS[0]}], "temperature": 0}
        r = httpx.post(f"{s.url}/v1/chat/completions", json=chat, timeout=120)
        assert r.status_code == 200, r.text
        assert 0 < r.json()["usage"]["total_tokens"] <= 256
        r = httpx.post(f"{s.url}/v1/chat/completions", json={**chat, "max_tokens": 300}, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
        assert r.json()["error"]["code"] == "context_length_exceeded"
        s.wait_idle()


def test_prompts_tokenized_off_the_event_loop_give_the_same_answers(srv, tiny_model, monkeypatch):
    from jllm.serve import app as app_module
    monkeypatch.setattr(app_module, "OFF_LOOP_CHARS", 0)  # every prompt through the worker thread
    c = srv.client()
    out = c.completions.create(model=NAME, prompt=PROMPTS[2], max_tokens=N, temperature=0)
    assert out.choices[0].text == ref(tiny_model, PROMPTS[2]).text
    chat = c.chat.completions.create(model=NAME, messages=[{"role": "user", "content": PROMPTS[0]}],
                                     max_tokens=N, temperature=0)
    [want] = jllm.generate(tiny_model, [format_chat([{"role": "user", "content": PROMPTS[0]}], tiny_model.tokenizer)],
                           max_new_tokens=N)
    assert chat.choices[0].message.content == want.text


def test_top_k_past_the_vocabulary_keeps_every_token(srv):
    body = {"model": NAME, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1.0, "seed": 7}
    plain = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=60)
    for top_k in (512, 2 ** 31, 10 ** 20):
        r = httpx.post(f"{srv.url}/v1/completions", json={**body, "top_k": top_k}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]
    assert httpx.get(f"{srv.url}/health", timeout=10).json() == {"status": "ok"}


def test_a_model_without_tokenizer_takes_and_returns_token_ids(tiny_model_no_tokenizer):
    model = tiny_model_no_tokenizer
    ids = [1, 17, 42, 99, 7]
    expected = ref(model, ids)
    with ThreadServer(make_engine(model, num_pages=64), model) as s:
        body = {"model": NAME, "prompt": ids, "max_tokens": N, "temperature": 0}
        r = httpx.post(f"{s.url}/v1/completions", json=body, timeout=60).json()
        assert r["choices"][0]["token_ids"] == expected.tokens and r["choices"][0]["text"] == ""
        with httpx.stream("POST", f"{s.url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as resp:
            chunks = [json.loads(x[6:]) for x in resp.iter_lines() if x.startswith("data: {")]
        assert [t for c in chunks for t in c["choices"][0]["token_ids"]] == expected.tokens
        err = httpx.post(f"{s.url}/v1/completions", json={**body, "prompt": "text"}, timeout=60)
        assert err.status_code == 400 and "token ids" in err.json()["error"]["message"]
        err = httpx.post(f"{s.url}/v1/chat/completions", json=CHAT, timeout=60)
        assert err.status_code == 400 and err.json()["error"]["param"] == "messages"
        cfg = loadgen.LoadConfig(url=s.url, model=NAME, num_prompts=4, input_len=8, output_len=N,
                                 vocab_size=512, ignore_eos=True, max_duration_s=60)
        [run] = loadgen.run(cfg, concurrencies=[2])["runs"]
        assert run["completed"] == 4 and run["output_tokens"] == 4 * N
        assert run["itl_ms"]["p50"] > 0   # timed from the token-id chunks


# --- back-pressure -----------------------------------------------------------------------------

def test_full_queue_answers_429_with_retry_after_and_accepted_requests_complete(tiny_model):
    engine = make_engine(tiny_model, max_seqs=1, max_queue=2, num_pages=64)
    engine.step_delay_s = 0.01
    expected = ref(tiny_model, PROMPTS[0])
    with ThreadServer(engine, tiny_model) as s:
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0}

        async def burst():
            async with httpx.AsyncClient(timeout=60) as client:
                return await asyncio.gather(*(client.post(f"{s.url}/v1/completions", json=body)
                                              for _ in range(10)))

        responses = asyncio.run(burst())
        codes = sorted(r.status_code for r in responses)
        assert set(codes) == {200, 429} and codes.count(200) >= 1, codes
        for r in responses:
            if r.status_code == 429:
                assert int(r.headers["Retry-After"]) >= 1
                assert r.json()["error"]["code"] == "queue_full"
            else:
                assert r.json()["choices"][0]["text"] == expected.text
        s.wait_idle()
        assert s.metric('jllm_requests_rejected_total{reason="queue_full"}') == codes.count(429)


# --- chat templates ----------------------------------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"},
     {"role": "assistant", "content": "Hi! "}, {"role": "user", "content": "  What is 2+2?\n"}],
    [{"role": "user", "content": "Grüße, naïve café 🙂 <s> and </s> typed"}],
]


@pytest.fixture(scope="module")
def hf_tokenizer_dir(tmp_path_factory, tokenizer_path):
    import shutil
    d = tmp_path_factory.mktemp("hf_tok")
    shutil.copyfile(tokenizer_path, d / "tokenizer.model")
    return d


def _hf_tokenizer(directory, template):
    transformers = pytest.importorskip("transformers")
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "chat_template": template, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "tokenizer_class": "LlamaTokenizer"}))
    return transformers.AutoTokenizer.from_pretrained(str(directory))


@pytest.mark.parametrize("template", [LLAMA2_TEMPLATE, CHATML_TEMPLATE], ids=["llama2", "chatml"])
def test_chat_template_renders_as_transformers_apply_chat_template(hf_tokenizer_dir, tokenizer, template):
    hf = _hf_tokenizer(hf_tokenizer_dir, template)
    ours = ChatTemplate(read_template(str(hf_tokenizer_dir)), tokenizer)
    for messages in CONVERSATIONS:
        expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert ours.render(messages) == expected


def test_llama2_template_tokenizes_like_format_chat_and_typed_special_tokens_stay_text(tokenizer):
    t = ChatTemplate(LLAMA2_TEMPLATE, tokenizer)
    for messages in CONVERSATIONS:
        assert chat_ids(messages, tokenizer, t) == format_chat(messages, tokenizer)
    ids = chat_ids(CONVERSATIONS[2], tokenizer, t)
    assert ids.count(tokenizer.bos_id) == 1 and tokenizer.eos_id not in ids
    with pytest.raises(ValueError, match="alternate"):
        chat_ids([{"role": "assistant", "content": "x"}], tokenizer, t)


def test_chat_through_a_template_from_tokenizer_config(tiny_model, hf_tokenizer_dir):
    (hf_tokenizer_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    template = read_template(str(hf_tokenizer_dir))
    messages = [{"role": "user", "content": "Hi"}]
    ids = ChatTemplate(template, tiny_model.tokenizer).encode(messages)
    expected = ref(tiny_model, ids)
    with ThreadServer(make_engine(tiny_model, max_seqs=4, num_pages=64), tiny_model, template) as s:
        r = s.client().chat.completions.create(model=NAME, messages=messages, max_tokens=N, temperature=0)
    assert r.choices[0].message.content == expected.text
    assert r.usage.prompt_tokens == len(ids)


# --- graceful shutdown (a real process and a real signal) -------------------------------------

def _wait_listening(proc: subprocess.Popen) -> str:
    """The URL a server process logs (JSON lines) once it listens."""
    lines = []
    watchdog = threading.Timer(120, proc.kill)   # a silent hang ends readline with ""
    watchdog.start()
    try:
        while True:
            line = proc.stderr.readline()
            if not line:
                proc.kill()
                raise AssertionError("the server did not start:\n" + "".join(lines))
            lines.append(line)
            if '"listening on' in line:
                return f"http://127.0.0.1:{json.loads(line)['port']}"
    finally:
        watchdog.cancel()


def _start_worker(tokenizer_path, *args) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "serve_worker.py"),
                             tokenizer_path, "--log-json", *args],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    return proc, _wait_listening(proc)


def test_sigterm_finishes_the_request_in_flight_refuses_new_ones_and_exits_0(tiny_model, tokenizer_path):
    proc, url = _start_worker(tokenizer_path, "--step-delay", "0.1", "--shutdown-timeout", "20")
    log_lines = []
    try:
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0}
        httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": 1}, timeout=60)  # compiled
        result = {}

        def in_flight():
            result["r"] = httpx.post(f"{url}/v1/completions", json=body, timeout=60)

        t = threading.Thread(target=in_flight)
        t.start()
        time.sleep(0.5)        # the request is running: 16 steps of 0.1 s
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        try:
            refused = httpx.post(f"{url}/v1/completions", json=body, timeout=10)
            assert refused.status_code == 503, refused.text
            assert refused.json()["error"]["type"] == "service_unavailable_error"
        except httpx.ConnectError:
            pass               # already closed: as good as a 503
        t.join(60)
        assert result["r"].status_code == 200
        assert result["r"].json()["choices"][0]["text"] == ref(tiny_model, PROMPTS[0]).text
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log_lines = proc.stderr.read().splitlines()
    # One JSON log line per request: the warm-up, the in-flight one, the refused one (if it
    # reached the server before it closed).
    requests = [json.loads(x) for x in log_lines if '"endpoint"' in x]
    served = [r for r in requests if r["status"] == 200]
    assert [r["finish_reason"] for r in served] == ["length", "length"]
    assert served[1]["completion_tokens"] == N and served[1]["prompt_tokens"] > 0
    assert 0 < served[1]["ttft_s"] < served[1]["total_s"]
    assert [r["status"] for r in requests if r not in served] in ([], [503])


def test_shutdown_timeout_aborts_what_is_left(tokenizer_path):
    proc, url = _start_worker(tokenizer_path, "--step-delay", "0.2", "--shutdown-timeout", "0.5")
    try:
        body = {"model": NAME, "prompt": PROMPTS[0], "max_tokens": N, "temperature": 0, "ignore_eos": True}
        result = {}
        t = threading.Thread(target=lambda: result.update(r=httpx.post(
            f"{url}/v1/completions", json=body, timeout=60)))
        t.start()
        time.sleep(1.0)
        proc.send_signal(signal.SIGTERM)
        t.join(60)
        assert result["r"].json()["choices"][0]["finish_reason"] == "abort"
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


# --- the command line and the load generator ---------------------------------------------------

def test_cli_checks_flags_a_busy_port_and_the_template_before_loading(tiny_checkpoint, tmp_path,
                                                                       capsys):
    import argparse
    p = argparse.ArgumentParser()
    serve_cli.add_arguments(p)
    args = p.parse_args(["--model", tiny_checkpoint])
    assert serve_cli.served_name(args) == os.path.basename(tiny_checkpoint)
    assert (args.host, args.port, args.shutdown_timeout) == ("127.0.0.1", 8000, 30.0)
    assert (args.max_seqs, args.max_tokens_per_step, args.max_prompts_per_step) == (64, 512, 16)
    assert args.compile_workers is None  # the Engine's default: 8 threads on a GPU, 1 elsewhere
    for bad in (["--port", "70000"], ["--max-seqs", "0"], ["--memory-fraction", "1.5"],
                ["--device-memory-fraction", "0"], ["--shutdown-timeout", "-1"], ["--quantize", "int3"], ["--decode-buckets", "0"],
                ["--speculate", "0"], ["--prompt-lookup", "-1"], ["--max-prompts-per-step", "0"],
                ["--compile-workers", "0"]):
        with pytest.raises(SystemExit):
            p.parse_args(["--model", tiny_checkpoint, *bad])
    busy = bind("127.0.0.1", 0)
    loggers = [logging.getLogger(n) for n in ("jllm.serve", "uvicorn", "uvicorn.error")]
    saved = [(x.handlers[:], x.propagate) for x in loggers]
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{% for %}"}))
    try:
        t0 = time.monotonic()
        assert serve_cli.main(["--model", tiny_checkpoint, "--port", str(busy.getsockname()[1])]) == 2
        assert "cannot listen" in capsys.readouterr().err
        assert serve_cli.main(["--model", str(broken), "--port", "0"]) == 2
        assert "chat_template does not compile" in capsys.readouterr().err
        assert serve_cli.main(["--model", tiny_checkpoint, "--port", "0", "--max-seqs", "8",
                               "--decode-buckets", "2", "4"]) == 2
        assert "--decode-buckets 2 4: the largest must be >= --max-seqs 8" in capsys.readouterr().err
        assert serve_cli.main(["--model", tiny_checkpoint, "--port", "0", "--speculate", "4"]) == 2
        assert "--speculate K and --prompt-lookup N go together" in capsys.readouterr().err
        assert serve_cli.main(["--model", tiny_checkpoint, "--port", "0", "--speculate", "4",
                               "--prompt-lookup", "3", "--tp", "2"]) == 2
        assert "--speculate runs on one device; got --tp 2" in capsys.readouterr().err
        assert serve_cli.main(["--model", tiny_checkpoint, "--port", "0", "--chat-template", "nonsense.jinja"]) == 2
        assert "--chat-template 'nonsense.jinja' is neither a file nor a jinja2 template" in capsys.readouterr().err
        assert serve_cli.main(["--model", tiny_checkpoint, "--port", "0", "--chat-template", "{% for %}"]) == 2
        assert "chat_template does not compile" in capsys.readouterr().err
        assert time.monotonic() - t0 < 10     # none loaded the model
        assert serve_cli.main(["--model", tiny_checkpoint, "--port", "0", "--max-model-len", "100000"]) == 2
        assert "max_model_len=100000 is over the model's max_seq_len=512" in capsys.readouterr().err
    finally:
        busy.close()
        for x, (handlers, propagate) in zip(loggers, saved):  # its handler writes to capsys
            x.handlers[:], x.propagate = handlers, propagate


def test_engine_flags_reach_the_engine(tiny_checkpoint, monkeypatch, capsys):
    import jllm.engine
    seen = {}

    def engine(model, **kw):
        seen.update(kw)
        raise ValueError("stop before serving")

    monkeypatch.setattr(jllm.engine, "Engine", engine)
    assert serve_cli.main(["--model", tiny_checkpoint, "--port", "0", "--max-prompts-per-step", "16",
                           "--max-tokens-per-step", "256", "--max-seqs", "8", "--decode-buckets", "2", "8",
                           "--compile-workers", "3"]) == 2
    assert "stop before serving" in capsys.readouterr().err
    assert (seen["max_prompts_per_step"], seen["max_tokens_per_step"], seen["max_seqs"], seen["decode_buckets"],
            seen["compile_workers"]) == (16, 256, 8, [2, 8], 3)


def test_load_generator_reports_sane_metrics(srv, tmp_path):
    cfg = loadgen.LoadConfig(url=srv.url, model=NAME, prompts="random-ids", num_prompts=8,
                             input_len=8, output_len=N, vocab_size=512, ignore_eos=True,
                             max_duration_s=60, request_timeout_s=60, slo_ttft_s=30.0, seed=1)
    report = loadgen.run(cfg, request_rates=[float("inf"), 50.0])
    report["runs"] += loadgen.run(cfg, concurrencies=[2])["runs"]
    for run in report["runs"]:
        assert (run["completed"], run["failed"], run["incomplete"]) == (8, 0, 0), run["errors"]
        assert run["output_tokens"] == 8 * N and run["prompt_tokens"] == 8 * 8
        assert run["request_throughput"] == pytest.approx(8 / run["duration_s"])
        assert run["output_token_throughput"] == pytest.approx(8 * N / run["duration_s"])
        for key in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
            s = run[key]
            assert 0 < s["p50"] <= s["p90"] <= s["p99"], (key, s)
        assert run["ttft_ms"]["p99"] <= run["e2e_ms"]["p99"]
        assert 0 < run["goodput"] <= run["request_throughput"] + 1e-9
    loadgen.write_json(report, str(tmp_path / "r.json"))
    assert json.loads((tmp_path / "r.json").read_text())["runs"][0]["request_rate"] == "inf"
    loadgen.plot(report, str(tmp_path / "r.png"))
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(tmp_path)) == ["r.json", "r.png"]


def test_load_generator_asks_for_json_objects(srv):
    """--json-mode: every request is guided to a JSON object; each completes (stopping when its
    object is complete, or at max_tokens) and is counted. --json-share F: that share, spread."""
    cfg = loadgen.LoadConfig(url=srv.url, model=NAME, prompts="random-words", num_prompts=4, input_len=4,
                             output_len=N, json_share=1.0, max_duration_s=60, request_timeout_s=60)
    assert loadgen._payload(cfg, "x", loadgen.asks_json(cfg, 0))["response_format"] == {"type": "json_object"}
    quarter = dataclasses.replace(cfg, json_share=0.25)
    assert [loadgen.asks_json(quarter, i) for i in range(8)] == [False, False, False, True] * 2
    assert not any(loadgen.asks_json(dataclasses.replace(cfg, json_share=0.0), i) for i in range(8))
    with pytest.raises(ValueError, match="json_share=1.5"):
        dataclasses.replace(cfg, json_share=1.5)
    [run] = loadgen.run(cfg, concurrencies=[2])["runs"]
    assert (run["completed"], run["failed"]) == (4, 0), run["errors"]
    assert 4 <= run["output_tokens"] <= 4 * N


def test_load_generator_counts_failures_and_bounds_the_run(srv):
    cfg = loadgen.LoadConfig(url=srv.url, model="not-served", prompts="random-words", num_prompts=4,
                             input_len=4, output_len=N, max_duration_s=10)
    [run] = loadgen.run(cfg, concurrencies=[2])["runs"]
    assert (run["completed"], run["failed"]) == (0, 4) and "404" in run["errors"][0]
    with pytest.raises(ValueError, match="num_prompts"):
        loadgen.LoadConfig(url=srv.url, model=NAME, num_prompts=0)
    with pytest.raises(ValueError, match="chat"):
        loadgen.LoadConfig(url=srv.url, model=NAME, endpoint="chat", prompts="random-ids")


def test_cli_serves_a_checkpoint_with_its_chat_template_and_exits_0_on_sigint(tiny_checkpoint, tmp_path,
                                                                             tokenizer):
    import shutil
    ck = tmp_path / "my-model"
    shutil.copytree(tiny_checkpoint, ck)
    (ck / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHATML_TEMPLATE}))
    proc = subprocess.Popen([sys.executable, "-m", "jllm.serve.cli", "--model", str(ck), "--port", "0",
                             "--max-seqs", "2", "--max-tokens-per-step", "32", "--num-pages", "64",
                             "--decode-buckets", "2", "1", "2", "--log-json", "--speculate", "3",
                             "--prompt-lookup", "2"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "JLLM_CACHE_DIR": "off"})
    try:
        url = _wait_listening(proc)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=60)
        assert [m.id for m in c.models.list().data] == ["my-model"]
        messages = [{"role": "user", "content": "Hi"}]
        r = c.chat.completions.create(model="my-model", messages=messages, max_tokens=4, temperature=0)
        assert r.usage.prompt_tokens == len(ChatTemplate(CHATML_TEMPLATE, tokenizer).encode(messages))
        assert r.usage.completion_tokens <= 4 and r.choices[0].finish_reason in ("length", "stop")
        # A guided request on a speculating engine (it decodes plainly; the grammar holds).
        r = c.chat.completions.create(model="my-model", messages=messages, max_tokens=12, temperature=0,
                                      extra_body={"guided_regex": "(yes|no)!"})
        assert r.choices[0].message.content in ("yes!", "no!") and r.choices[0].finish_reason == "stop"
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stderr.close()


def _sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


CHUNK = json.dumps({"choices": [{"index": 0, "text": "Hi", "finish_reason": None}]})
LAST = json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})
USAGE = json.dumps({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})


@pytest.mark.parametrize("body, error", [
    (_sse(CHUNK, CHUNK, LAST, USAGE, "[DONE]"), None),
    (_sse(CHUNK, CHUNK, LAST, USAGE), "without data: [DONE]"),
    (b'{"choices": [{"text": "Hi"}]}', "without data: [DONE]"),
    (_sse(CHUNK, json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "abort"}]}), USAGE, "[DONE]"),
     "finish_reason 'abort'"),
    (_sse(CHUNK, "null", "[DONE]"), "not a JSON object"),
], ids=["complete", "no_done", "not_sse", "aborted", "null_event"])
def test_load_generator_counts_only_streams_that_finish(body, error):
    """A request counts as completed only when its stream ends with [DONE] after a finish_reason
    of stop or length; anything else (an abort at the server's shutdown, a cut stream, a bad
    event) is a failure with its reason, never an exception that ends the client's worker."""
    transport = httpx.MockTransport(lambda request: httpx.Response(200, content=body))
    cfg = loadgen.LoadConfig(url="http://127.0.0.1:9", model=NAME, output_len=2)

    async def run():
        async with httpx.AsyncClient(transport=transport) as client:
            return await loadgen.send(client, "http://127.0.0.1:9/v1/completions", cfg, [5, 6, 7])
    result = asyncio.run(run())
    assert result.ok == (error is None)
    if error is None:
        assert (result.output_tokens, result.prompt_tokens) == (2, 3) and result.e2e_s > 0
    else:
        assert error in result.error


@pytest.mark.parametrize("field", ["max_duration_s", "request_timeout_s", "slo_ttft_s"])
def test_load_generator_refuses_infinite_limits_before_running(field):
    with pytest.raises(ValueError, match=f"{field}=inf must be a finite number > 0"):
        loadgen.LoadConfig(url="http://127.0.0.1:9", model=NAME, **{field: float("inf")})
