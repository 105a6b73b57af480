"""Guided decoding in the engine: JSON schemas, JSON mode, regexes and Lark grammars restrict each
sampled token (llguidance's masks). Greedy output equals a step-by-step reference (a full float32
forward per token, the grammar's mask applied in numpy) under continuous batching, preemption and
aborts; the text parses as what was asked; unguided requests beside them are unchanged."""
import json
import re
import sys
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jllm
from jllm import guided as guided_mod
from jllm.engine import Engine, SamplingParams
from jllm.guided import Guided, GuideTokenizer
from jllm.kvcache import init_cache
from jllm.model import forward

KW = dict(max_seqs=4, page_size=4, num_pages=40, max_tokens_per_step=16, chunk_row=8,
          decode_buckets=(2, 4), progress=False)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                           "n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "ok": {"type": "boolean"}},
          "required": ["name", "n", "ok"], "additionalProperties": False}


@pytest.fixture(params=["lagged", "sync"])
def mode(request, monkeypatch):
    """How the engine runs guided requests: "lagged" (one step in flight, a guided request sits
    out the step after each sample) or "sync" (steps one at a time while one runs)."""
    from jllm.engine import engine as engine_mod
    monkeypatch.setattr(engine_mod, "GUIDED_SYNC_SHARE", 10.0 if request.param == "lagged" else 0.0)
    return request.param


def _reference(model, prompt: list[int], guided: Guided, max_tokens: int, bias: dict | None = None):
    """Greedy tokens under the grammar, one full forward per token -> (tokens, finish reason)."""
    matcher = GuideTokenizer(model.tokenizer, model.cfg.vocab_size).matcher(guided)
    fwd = jax.jit(forward, static_argnames="cfg")
    seq, out, T = list(prompt), [], 128
    for _ in range(max_tokens):
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :len(seq)] = seq
        lg, _ = fwd(model.params, jnp.asarray(tokens), init_cache(model.cfg, 1, T, jnp.float32), cfg=model.cfg)
        lg = np.array(lg[0, len(seq) - 1], np.float64)
        for t, b in (bias or {}).items():
            lg[t] += b
        lg[~matcher.allowed()] = -np.inf
        t = int(np.argmax(lg))
        if t == model.tokenizer.eos_id:
            return out, "stop"
        out.append(t)
        seq.append(t)
        assert matcher.take(t)
        if matcher.done:
            return out, "stop"
    return out, "length"


def _run(engine: Engine, requests: list[tuple[list[int], SamplingParams]], abort_after: dict | None = None,
         overlapped: list | None = None):
    """Add all requests, step to the end (aborting request i after abort_after[i] steps) -> outputs
    by index; overlapped gets, per step, whether a step stayed in flight while a guided request ran."""
    ids = {engine.add_request(p, sp): i for i, (p, sp) in enumerate(requests)}
    got = {i: ([], "", None) for i in range(len(requests))}
    step = 0
    while engine.has_unfinished():
        if overlapped is not None and step:
            overlapped.append(engine._inflight is not None and bool(engine._guided))
        for rid, i in ids.items():
            if (abort_after or {}).get(i) == step:
                engine.abort(rid)
        for o in engine.step():
            toks, text, _ = got[ids[o.request_id]]
            got[ids[o.request_id]] = (toks + o.token_ids, text + o.text, o.finish_reason)
        step += 1
        assert step < 500
    return got


def _check_schema(text: str, layout: bool = True) -> None:
    obj = json.loads(text)
    assert list(obj) == ["name", "n", "ok"]   # the schema's order
    assert isinstance(obj["name"], str) and len(obj["name"]) <= 6
    assert isinstance(obj["n"], int) and 0 <= obj["n"] <= 99 and isinstance(obj["ok"], bool)
    if layout:  # json.dumps's: ", " and ": ", nothing else (a sampled string may hold escapes)
        assert text == json.dumps(obj, ensure_ascii=False)


def test_guided_greedy_equals_the_reference_beside_unguided_requests(tiny_model, mode):
    m, tok = tiny_model, tiny_model.tokenizer
    prompts = [tok.encode(t) for t in ("Give me JSON:", "Answer yes or no", "Once upon a time", "A list")]
    regex = r"(yes|no), [0-9]{2,3}!"
    lark = 'start: item (", " item)*\nitem: "a" | "b" | "cc"'
    reqs = [(prompts[0], SamplingParams(max_tokens=60, guided=Guided.json_schema(SCHEMA))),
            (prompts[1], SamplingParams(max_tokens=20, guided=Guided.regex(regex))),
            (prompts[2], SamplingParams(max_tokens=12, stop_token_ids=())),
            (prompts[3], SamplingParams(max_tokens=9, guided=Guided.lark(lark), logit_bias=((tok.encode("b", bos=False)[-1], 5.0),))),
            (prompts[2], SamplingParams(max_tokens=20, guided=Guided.json_object()))]
    overlapped = []
    got = _run(Engine(m, **KW), reqs, overlapped=overlapped)
    # lagged: most steps leave the next in flight beside guided requests; sync: only a guided
    # request's admission step (its first mask needs no token) may.
    if mode == "lagged":
        assert sum(overlapped) > len(overlapped) / 2, overlapped
    else:
        assert sum(overlapped) <= 4, overlapped
    for i, (prompt, sp) in enumerate(reqs):
        toks, text, reason = got[i]
        if sp.guided is None:
            [ref] = jllm.generate(m, [prompt], max_new_tokens=12, stop_token_ids=[])
            assert toks == ref.tokens and reason == "length"
            continue
        assert (toks, reason) == _reference(m, prompt, sp.guided, sp.max_tokens, dict(sp.logit_bias)), i
        assert text == tok.decode_after(prompt[-1], toks)
    _check_schema(got[0][1])
    assert got[0][2] == "stop" and re.fullmatch(regex, got[1][1]) and got[1][2] == "stop"
    assert re.fullmatch(r'(a|b|cc)(, (a|b|cc))*,?( )?', got[3][1])
    assert got[4][1].startswith("{")


def test_guided_requests_survive_preemption_and_aborts(tiny_model, mode):
    """A pool of 12 pages (48 tokens) for four guided requests of up to ~35 tokens each: some are
    preempted and recomputed, one is aborted; the others still equal the reference and every
    page is free at the end."""
    m, tok = tiny_model, tiny_model.tokenizer
    prompts = [tok.encode(t) for t in ("Some JSON please", "More JSON", "JSON again, now", "Last one")]
    reqs = [(p, SamplingParams(max_tokens=28, guided=Guided.json_schema(SCHEMA))) for p in prompts]
    engine = Engine(m, **{**KW, "num_pages": 12})
    got = _run(engine, reqs, abort_after={2: 3})
    assert got[2][2] == "abort"
    for i in (0, 1, 3):
        assert got[i][:1] + got[i][2:] == _reference(m, prompts[i], reqs[i][1].guided, 28), i
    assert engine.scheduler.preemptions > 0, "the pool was meant to force a preemption"
    engine.pool.check()
    assert engine.pool.used == 0 and engine.pool.available() == engine.num_pages


def test_a_grammar_completed_on_the_last_allowed_token_stops_and_eos_never_shows(tiny_model, mode):
    """Output that completes the grammar exactly at max_tokens ends "stop", not "length"; with
    stop_token_ids=() (ignore EOS) a guided output still ends at EOS, which is not in it."""
    m, tok = tiny_model, tiny_model.tokenizer
    prompt = tok.encode("Count:")
    regex = Guided.regex(r"[0-9]{1,3}( [0-9]{1,3})*")
    ref, reason = _reference(m, prompt, regex, 40)
    assert reason == "stop" and 1 < len(ref) < 40
    [full] = Engine(m, **KW).generate([prompt], SamplingParams(max_tokens=40, guided=regex))
    assert full.token_ids == ref and full.finish_reason == "stop"
    schema = Guided.json_schema({"type": "object", "properties": {"n": {"type": "integer", "minimum": 0,
                                                                         "maximum": 9}}, "required": ["n"],
                                 "additionalProperties": False})
    ref, reason = _reference(m, prompt, schema, 40)
    assert reason == "stop"
    [exact] = Engine(m, **KW).generate([prompt], SamplingParams(max_tokens=len(ref), guided=schema))
    assert exact.token_ids == ref and exact.finish_reason == "stop"
    [short] = Engine(m, **KW).generate([prompt], SamplingParams(max_tokens=len(ref) - 1, guided=schema))
    assert short.token_ids == ref[:-1] and short.finish_reason == "length"
    [no_eos] = Engine(m, **KW).generate([prompt], SamplingParams(max_tokens=40, guided=regex, stop_token_ids=()))
    assert no_eos.token_ids == full.token_ids and tok.eos_id not in no_eos.token_ids
    assert no_eos.finish_reason == "stop"


def test_sampled_guided_output_is_valid_and_seeded(tiny_model, mode):
    m, tok = tiny_model, tiny_model.tokenizer
    prompt = tok.encode("JSON:")
    sp = SamplingParams(max_tokens=60, temperature=1.0, seed=5, guided=Guided.json_schema(SCHEMA))
    outs = [_run(Engine(m, **KW), [(prompt, sp), (prompt, sp)]) for _ in range(2)]
    assert outs[0] == outs[1] and outs[0][0] == outs[0][1]
    for toks, text, reason in outs[0].values():
        assert reason == "stop"
        _check_schema(text, layout=False)


def test_bad_grammars_and_missing_pieces_are_clear_errors(tiny_model, tiny_model_no_tokenizer, monkeypatch):
    engine = Engine(tiny_model, **KW)
    for g, match in [(Guided.regex("(ab"), "invalid regex"), (Guided.lark("start: ("), "invalid lark"),
                     (Guided.json_schema({"type": "nonsense"}), "invalid json_schema")]:
        with pytest.raises(ValueError, match=match):
            engine.add_request([1, 5, 6], SamplingParams(max_tokens=4, guided=g))
    assert not engine.has_unfinished()
    with pytest.raises(TypeError, match="SamplingParams.guided="):
        SamplingParams(guided={"type": "json_object"})
    with pytest.raises(ValueError, match="Guided.kind='xml'"):
        Guided("xml", "x")
    with pytest.raises(ValueError, match="not valid JSON"):
        Guided.json_schema("{not json")
    with pytest.raises(ValueError, match="look-around.* is not supported"):   # the cause, not only the headline
        engine.add_request([1, 5], SamplingParams(max_tokens=4, guided=Guided.json_schema(
            {"type": "object", "properties": {"a": {"type": "string", "pattern": "(?=x)"}}})))
    no_tok = Engine(tiny_model_no_tokenizer, **KW)
    with pytest.raises(ValueError, match="guided=json_object needs a tokenizer"):
        no_tok.add_request([1, 5], SamplingParams(max_tokens=4, guided=Guided.json_object()))
    assert engine.prepare_guided() and not no_tok.prepare_guided()
    monkeypatch.setitem(sys.modules, "llguidance", None)   # as if not installed: its import fails
    monkeypatch.setattr(guided_mod, "_VIEWS", weakref.WeakKeyDictionary())   # and nothing built with it yet
    bare = Engine(tiny_model, **KW)
    assert not bare.prepare_guided()
    with pytest.raises(ValueError, match=r"needs the llguidance package: pip install llguidance"):
        bare.add_request([1, 5], SamplingParams(max_tokens=4, guided=Guided.json_object()))
    assert not no_tok.has_unfinished()


def test_generate_takes_a_grammar_as_the_engine_does(tiny_model, tiny_model_no_tokenizer):
    """jllm.generate(guided=...): greedy rows of a batch equal the step-by-step reference, a seeded
    sampled row the engine's request with that seed; the stream adds up; logprobs still align."""
    m, tok = tiny_model, tiny_model.tokenizer
    guided = Guided.json_schema(SCHEMA)
    prompts = [tok.encode("JSON please:"), tok.encode("Another object, in JSON")]
    seen = []
    outs = jllm.generate(m, prompts, max_new_tokens=50, guided=guided, stream=seen.append, logprobs=1)
    for prompt, out in zip(prompts, outs):
        assert (out.tokens, out.finish_reason) == _reference(m, prompt, guided, 50)
        _check_schema(out.text)
        assert [t for t, _, _ in out.logprobs] == out.tokens
    for i, out in enumerate(outs):
        assert "".join(d.text for d in seen if d.index == i) == out.text
    sp = SamplingParams(max_tokens=50, temperature=1.0, seed=11, guided=Guided.regex(r"(yes|no), [0-9]{2}!"))
    [eng] = Engine(m, **KW).generate([prompts[0]], sp)
    [gen] = jllm.generate(m, [prompts[0]], max_new_tokens=50, temperature=1.0, seed=11, guided=sp.guided)
    assert gen.tokens == eng.token_ids and gen.text == eng.text and gen.finish_reason == "stop"
    assert re.fullmatch(r"(yes|no), [0-9]{2}!", gen.text)
    with pytest.raises(ValueError, match="invalid regex"):
        jllm.generate(m, [prompts[0]], max_new_tokens=4, guided=Guided.regex("(ab"))
    with pytest.raises(TypeError, match="guided="):
        jllm.generate(m, [prompts[0]], max_new_tokens=4, guided={"type": "json_object"})
    with pytest.raises(ValueError, match="needs a tokenizer"):
        jllm.generate(tiny_model_no_tokenizer, [[1, 2]], max_new_tokens=4, guided=Guided.json_object())
    from jllm.speculative import PromptLookup, Speculative
    with pytest.raises(ValueError, match="not supported with speculative"):
        jllm.generate(m, [prompts[0]], max_new_tokens=4, guided=Guided.json_object(),
                      speculative=Speculative(PromptLookup(2), 2))
