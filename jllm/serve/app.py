"""The FastAPI app: OpenAI's /v1/completions, /v1/chat/completions and /v1/models, plus /health
and /metrics, in front of an EngineRunner.

Every error is an OpenAI error object (protocol.APIError); a full queue is a 429 with
Retry-After, a draining server a 503. A client that goes away (streaming or not) aborts its
request, so its slot and pages are free before the engine's next step.

Over 400 lines: every endpoint, its streaming and its error mapping in one place.
"""
import asyncio
import contextlib
import dataclasses
import logging
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jllm.config import LlamaConfig
from jllm.engine import QueueFull, SamplingParams
from jllm.engine.api import seed_int32
from jllm.serve import responses as R
from jllm.chat import ChatTemplate, chat_ids
from jllm.serve.metrics import CONTENT_TYPE, Metrics
from jllm.serve.protocol import (MAX_BODY_BYTES, APIError, ChatRequest, CompletionRequest,
                                 bad_request, decode_json, validate)
from jllm.serve.runner import EngineRunner, EngineUnavailable, RequestStream
from jllm.serve.tools import auto_tool_calls, render_messages, tool_calls
from jllm.tokenizer import Tokenizer

log = logging.getLogger("jllm.serve")
DEFAULT_COMPLETION_TOKENS = 16   # OpenAI's default max_tokens for /v1/completions
RETRY_AFTER_S = 1                # what a 429 or 503 tells the client to wait
OFF_LOOP_CHARS = 16_384          # longer texts are tokenized in a thread (~4 ms of the event loop)


async def _tokenize(fn: Callable, *args, chars: int):
    """fn(*args) on the event loop for short texts, in a worker thread for long ones, so that one
    large prompt does not stall every other request's stream (a 7.5 MB one took 1.7 s)."""
    return fn(*args) if chars <= OFF_LOOP_CHARS else await asyncio.to_thread(fn, *args)


@dataclasses.dataclass
class ServerState:
    """What graceful shutdown needs: whether new requests are refused, and how many are open."""
    draining: bool = False
    in_flight: int = 0


class Generation:
    """One request's outputs as the client receives them: text, usage, and token timings."""

    def __init__(self, stream: RequestStream, metrics: Metrics, t_arrival: float, prompt_only: bool = False):
        self.stream, self.metrics, self.t_arrival = stream, metrics, t_arrival
        self.prompt_only = prompt_only  # max_tokens=0: the engine's one sample is not shown
        self.request_id = stream.request_id
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.t_first: float | None = None
        self._t_last = 0.0

    @property
    def finished(self) -> bool:
        return self.stream.finished

    async def outputs(self) -> AsyncIterator:
        async for out in self.stream:
            if self.prompt_only:
                out = dataclasses.replace(out, text="", token_ids=[], logprobs=None, completion_tokens=0,
                                          finish_reason="length" if out.finish_reason in ("stop", "length")
                                          else out.finish_reason)
            now = time.perf_counter()
            n = len(out.token_ids)
            if n and self.t_first is None:
                self.t_first = now
                self.metrics.ttft.observe(now - self.t_arrival)
            elif n:
                for _ in range(n):  # a delta of n tokens: n gaps of equal length
                    self.metrics.itl.observe((now - self._t_last) / n)
            if n:
                self._t_last = now
            self.prompt_tokens, self.completion_tokens = out.prompt_tokens, out.completion_tokens
            if out.finished:
                self.finish_reason = out.finish_reason
                self.metrics.latency.observe(now - self.t_arrival)
            yield out

    def log(self, endpoint: str, stream: bool, status: int = 200) -> None:
        now = time.perf_counter()
        log.info("%s %d %s", endpoint, status, self.finish_reason or "unfinished", extra={"fields": {
            "request_id": self.request_id, "endpoint": endpoint, "status": status, "stream": stream,
            "prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
            "ttft_s": None if self.t_first is None else round(self.t_first - self.t_arrival, 6),
            "total_s": round(now - self.t_arrival, 6), "finish_reason": self.finish_reason}})


class EventStream(StreamingResponse):
    """An SSE response that runs `on_close` however it ends (done, client gone, cancelled)."""

    def __init__(self, content, on_close: Callable[[], None]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _disconnected(request: Request) -> None:
    """Return when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _merged(gens: list[Generation]) -> AsyncIterator[tuple[int, Any]]:
    """(choice index, output) of every generation as each arrives; an error of one ends it."""
    if len(gens) == 1:
        async for out in gens[0].outputs():
            yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, gen: Generation) -> None:
        try:
            async for out in gen.outputs():
                queue.put_nowait((i, out))
        except Exception as e:
            queue.put_nowait((i, e))
        queue.put_nowait((i, None))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        left = len(gens)
        while left:
            i, item = await queue.get()
            if item is None:
                left -= 1
            elif isinstance(item, Exception):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


async def _read_body(request: Request) -> dict:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise APIError(413, f"the request body has {length} bytes; the limit is {MAX_BODY_BYTES}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise APIError(413, f"the request body is over the limit of {MAX_BODY_BYTES} bytes")
        chunks.append(chunk)
    return decode_json(b"".join(chunks))


def create_app(runner: EngineRunner, served_model_name: str, *, cfg: LlamaConfig,
               tokenizer: Tokenizer | None, chat_template: str | None = None) -> FastAPI:
    """The server app around a (not yet started) EngineRunner; its lifespan starts and stops it.

    Requests are checked against the engine's context (`Engine.context`: its max_model_len, or
    its whole page pool where that is smaller) and cfg's vocab_size; chat_template is a Hugging
    Face jinja2 template (None: Llama-2's chat format).
    """
    if chat_template is not None and tokenizer is None:
        raise ValueError("a chat_template needs a tokenizer; this model has none")
    template = ChatTemplate(chat_template, tokenizer) if chat_template is not None else None
    context = runner.engine.context  # a request's prompt and output tokens at most
    metrics = Metrics(lambda: runner.stats)
    state = ServerState()
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        runner.start(asyncio.get_running_loop())
        yield
        await runner.stop()

    app = FastAPI(lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.serve = state
    app.state.runner = runner
    app.state.metrics = metrics

    # --- errors -------------------------------------------------------------------------------

    def error_response(request: Request, e: APIError) -> JSONResponse:
        if request.url.path.startswith("/v1/"):
            log.info("%s %d %s", request.url.path, e.status, e.message, extra={
                "fields": {"endpoint": request.url.path, "status": e.status, "error": e.message}})
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(APIError)
    async def on_api_error(request: Request, e: APIError):
        return error_response(request, e)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, e: StarletteHTTPException):
        if e.status_code == 404:
            message = (f"{request.method} {request.url.path} is not an endpoint of this server; it "
                       "serves /v1/completions, /v1/chat/completions, /v1/models, /health, /metrics")
        elif e.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(e.detail)
        return error_response(request, APIError(e.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, e: RequestValidationError):
        return error_response(request, bad_request(f"invalid request: {e.errors()[0].get('msg')}"))

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, e: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return error_response(request, APIError(500, "internal server error (see the server log)"))

    # --- request checks -----------------------------------------------------------------------

    def accepting() -> None:
        if state.draining:
            metrics.rejected.labels("shutting_down").inc()
            raise APIError(503, "the server is shutting down", headers={
                "Retry-After": str(RETRY_AFTER_S), "Connection": "close"})
        if not runner.alive:
            raise APIError(503, "the engine is not running" + (
                f" (it failed: {runner.error!r})" if runner.error is not None else ""))

    def check_model(name: str) -> None:
        if name != served_model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves "
                                f"{served_model_name!r}", param="model", code="model_not_found")

    def prompt_ids(prompt: str | list[int], name: str = "the prompt") -> list[int]:
        if isinstance(prompt, str):
            if tokenizer is None:
                raise bad_request("this model has no tokenizer: send the prompt as a list of "
                                  "token ids", "prompt")
            try:
                return tokenizer.encode(prompt, bos=True)
            except ValueError as e:  # text the tokenizer cannot take (a lone surrogate)
                raise bad_request(f"{name} cannot be tokenized: {e}", "prompt") from None
        bad = [t for t in prompt if not 0 <= t < cfg.vocab_size]
        if bad:
            raise bad_request(f"{name} has token ids outside [0, {cfg.vocab_size}): {bad[:5]}",
                              "prompt")
        return prompt

    def token_budget(n_prompt: int, requested: int | None, default: int | None,
                     prompt_param: str, limit_param: str, name: str | None = None) -> int:
        name = name or f"the {prompt_param}"
        room = context - n_prompt
        if room < 1:
            raise bad_request(f"{name} has {n_prompt} tokens; the server's context is "
                              f"{context} tokens, with no room left for a completion",
                              prompt_param, "context_length_exceeded")
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise bad_request(f"{limit_param}={requested} plus {name}'s {n_prompt} "
                              f"tokens is {n_prompt + requested}, over the server's context of "
                              f"{context} tokens", limit_param, "context_length_exceeded")
        return requested

    def sampling(req, max_tokens: int, logprobs: int | None, index: int = 0) -> SamplingParams:
        bad = [t for t in req.logit_bias if t >= cfg.vocab_size]
        if bad:
            raise bad_request(f"logit_bias has token ids outside [0, {cfg.vocab_size}): {bad[:5]}", "logit_bias")
        # OpenAI takes any int64 seed, the engine a 32-bit one: fold it (generate's seeds are kept).
        # Choice i of a request samples with seed + i.
        seed = secrets.randbelow(2 ** 31) if req.seed is None else seed_int32(req.seed + index)
        try:
            return SamplingParams(
                max_tokens=max_tokens, temperature=1.0 if req.temperature is None else req.temperature,
                top_k=req.top_k, top_p=req.top_p, min_p=req.min_p, seed=seed, stop=tuple(req.stop),
                presence_penalty=req.presence_penalty or 0.0, frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                logit_bias=req.logit_bias,
                stop_token_ids=() if req.ignore_eos else None, logprobs=logprobs, guided=req.guided)
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None

    async def start(request_id: str, choices: list[tuple[list[int], SamplingParams]],
                    t_arrival: float, prompt_only: bool = False) -> list[Generation]:
        """Add one engine request per choice, all or none (Engine.add_requests)."""
        accepting()  # again: the body may have taken a while
        max_queue = runner.engine.max_queue
        if max_queue is not None and len(choices) > max_queue:
            raise bad_request(f"{len(choices)} choices (n times the prompts) are more than this server "
                              f"queues at once ({max_queue}, --max-queue)", "n")
        ids = [request_id] if len(choices) == 1 else [f"{request_id}-{i}" for i in range(len(choices))]
        try:
            added = await runner.add_many([(rid, prompt, params) for rid, (prompt, params) in zip(ids, choices)])
        except QueueFull as e:
            metrics.rejected.labels("queue_full").inc()
            raise APIError(429, f"the server is at capacity ({e}); retry later",
                           code="queue_full", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except (ValueError, TypeError) as e:
            raise bad_request(str(e)) from None
        except EngineUnavailable as e:
            raise APIError(503, str(e)) from None
        return [Generation(stream, metrics, t_arrival, prompt_only) for stream in added]

    async def respond(request: Request, gens: list[Generation], stream: bool,
                      events: Callable[[], AsyncIterator[str]], body: Callable[[], dict]):
        """Stream the events, or collect the outputs and answer `body()`; abort if the client goes."""
        endpoint = request.url.path
        state.in_flight += 1

        def close() -> None:
            for gen in gens:
                if not gen.finished:
                    runner.abort(gen.request_id)
                    gen.finish_reason = gen.finish_reason or "abort"
            state.in_flight -= 1
            for gen in gens:
                gen.log(endpoint, stream)

        if stream:
            closed = False

            def on_close() -> None:
                nonlocal closed
                if not closed:
                    closed = True
                    close()

            return EventStream(events(), on_close)

        async def abort_on_disconnect() -> None:
            await _disconnected(request)
            for gen in gens:
                runner.abort(gen.request_id)

        watcher = asyncio.ensure_future(abort_on_disconnect())
        try:
            result = await body()
        except EngineUnavailable as e:
            raise APIError(503, str(e)) from None
        finally:
            watcher.cancel()
            close()
        return JSONResponse(result)

    def usage(gens: list[Generation], per_prompt: int) -> dict:
        """Each prompt's tokens once (a prompt with n choices is read once), every choice's output."""
        return R.usage(sum(g.prompt_tokens for g in gens[::per_prompt]),
                       sum(g.completion_tokens for g in gens))

    def error_event(e: Exception) -> str:
        return R.sse(APIError(503, str(e)).body())

    # --- endpoints ----------------------------------------------------------------------------

    @app.get("/health")
    async def health():
        if state.draining or not runner.alive:
            return JSONResponse({"status": "draining" if state.draining else "engine stopped"},
                                status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics_endpoint():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    def model_card() -> dict:
        return {"id": served_model_name, "object": "model", "created": created,
                "owned_by": "jllm", "max_model_len": context}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        t_arrival = time.perf_counter()
        accepting()
        req = validate(CompletionRequest, await _read_body(request))
        check_model(req.model)
        want_logprobs, echo = req.logprobs is not None, bool(req.echo)
        if echo and want_logprobs and not runner.engine.prompt_logprobs:
            raise bad_request("echo=true with logprobs needs the prompt's logprobs: start the server with "
                              "--prompt-logprobs", "echo")
        names = ["the prompt"] if len(req.prompt) == 1 else [f"prompt {i}" for i in range(len(req.prompt))]
        prompts = [await _tokenize(prompt_ids, p, name, chars=len(p) if isinstance(p, str) else 0)
                   for p, name in zip(req.prompt, names)]
        n = req.choices_per_prompt
        choices = []   # prompt i's choices are i * n ... i * n + n - 1, as OpenAI numbers them
        for ids, name in zip(prompts, names):
            max_tokens = token_budget(len(ids), req.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt",
                                      "max_tokens", name)
            for j in range(n):
                params = sampling(req, max(max_tokens, 1), req.logprobs, len(choices))
                if echo and want_logprobs:
                    params = dataclasses.replace(params, prompt_logprobs=req.logprobs)
                choices.append((ids, params))
        request_id = f"cmpl-{uuid.uuid4().hex}"
        # max_tokens=0 (with echo): the engine samples one token, which the client does not see.
        gens = await start(request_id, choices, t_arrival, prompt_only=req.max_tokens == 0)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        ids_out = tokenizer is None   # no text to send: send the token ids

        def echoed(i: int, first) -> tuple[str, dict | None, list[int]]:
            """Choice i's prompt as echoed: its text (the prompt as sent, or its ids decoded), its
            logprobs (from the engine's first output) with each token's offset in that text, and
            its token ids."""
            p, ids = req.prompt[i // n], prompts[i // n]
            if tokenizer is None:
                text, offsets = "", [0] * len(ids)
            elif isinstance(p, str):
                text, offsets = p, tokenizer.encode_offsets(p)
                offsets = [0] * (len(ids) - len(offsets)) + offsets   # BOS first, at 0
            else:
                text, offsets = tokenizer.decode_offsets(ids)
            lp = None
            if want_logprobs:
                plp = first.prompt_logprobs or []
                entries = [e if e is not None else (ids[k], None, None) for k, e in enumerate(plp)]
                lp = R.completion_logprobs(entries, tokenizer, 0, offsets[:len(entries)])
            return text, lp, ids

        async def events() -> AsyncIterator[str]:
            offsets, seen = [0] * len(gens), [False] * len(gens)

            def chunk(i: int, text: str, lp: dict | None, ids: list[int], finish: str | None = None) -> str:
                return R.sse(R.completion_chunk(request_id, created, served_model_name, text, finish, lp,
                                                include_usage, ids if ids_out else None, i))

            try:
                async for i, out in _merged(gens):
                    if echo and not seen[i]:
                        text, lp, ids = echoed(i, out)
                        offsets[i] = len(text)
                        yield chunk(i, text, lp, ids)
                    seen[i] = True
                    if out.text or want_logprobs and out.logprobs or ids_out and out.token_ids:
                        lp = R.completion_logprobs(out.logprobs or [], tokenizer, offsets[i],
                                                   end=offsets[i] + len(out.text)) if want_logprobs else None
                        offsets[i] += len(out.text)
                        yield chunk(i, out.text, lp, out.token_ids)
                    if out.finished:
                        yield chunk(i, "", None, [], out.finish_reason)
            except EngineUnavailable as e:
                yield error_event(e)
            if include_usage and all(g.finish_reason for g in gens):
                yield R.sse(R.usage_chunk(request_id, created, served_model_name, "text_completion",
                                          usage(gens, n)))
            yield R.sse("[DONE]")

        async def body() -> dict:
            text = [[] for _ in gens]
            parts = [[] for _ in gens]    # logprobs of each output, with their offsets in the text
            token_ids = [[] for _ in gens]
            echoes = [None] * len(gens)   # (text, logprobs) of each choice's echoed prompt
            async for i, out in _merged(gens):
                if echo and echoes[i] is None:
                    t, lp, ids = echoed(i, out)
                    echoes[i] = (t, lp)
                    token_ids[i] += ids
                    text[i].append(t)
                if want_logprobs and out.logprobs:
                    at = sum(map(len, text[i]))
                    parts[i].append(R.completion_logprobs(out.logprobs, tokenizer, at, end=at + len(out.text)))
                text[i].append(out.text)
                token_ids[i] += out.token_ids

            def logprobs(i: int) -> dict | None:
                if not want_logprobs:
                    return None
                lps = ([echoes[i][1]] if echoes[i] else []) + parts[i]
                return {k: [v for lp in lps for v in lp[k]] for k in ("tokens", "token_logprobs", "top_logprobs",
                                                                        "text_offset")}

            return R.completion(request_id, created, served_model_name, [
                R.completion_choice(i, "".join(text[i]), g.finish_reason, logprobs(i),
                                    token_ids[i] if ids_out else None)
                for i, g in enumerate(gens)], usage(gens, n))

        return await respond(request, gens, bool(req.stream), events, body)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        t_arrival = time.perf_counter()
        accepting()
        req = validate(ChatRequest, await _read_body(request))
        check_model(req.model)
        if tokenizer is None:
            raise bad_request("this model has no tokenizer, so it cannot chat; use /v1/completions "
                              "with token ids", "messages")
        messages = [{"role": m.role, "content": m.content}
                    | ({"tool_calls": m.tool_calls} if m.tool_calls else {})
                    | ({"tool_call_id": m.tool_call_id} if m.tool_call_id is not None else {}) for m in req.messages]
        takes_tools = template is not None and template.takes_tools
        tools = req.tools if req.tools and (req.forced_tools or req.auto_tools or takes_tools) else None
        messages = render_messages(messages, tools, takes_tools)
        try:
            ids = await _tokenize(chat_ids, messages, tokenizer, template, tools,
                                  chars=sum(len(str(m["content"])) for m in messages))
        except ValueError as e:
            raise bad_request(str(e), "messages") from None
        limit_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        max_tokens = token_budget(len(ids), req.token_limit, None, "messages", limit_param)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        n_logprobs = (req.top_logprobs or 0) if req.logprobs else None
        n = req.choices_per_prompt
        gens = await start(request_id, [(ids, sampling(req, max_tokens, n_logprobs, i)) for i in range(n)],
                           t_arrival)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def logprobs_of(out) -> dict | None:
            return R.chat_logprobs(out.logprobs or [], tokenizer) if req.logprobs else None

        def reply(text: str, finish: str) -> tuple[dict, str]:
            """The message of a finished choice and its finish reason: tool calls when forced and
            complete, or when "auto" and the reply is a call; else the text."""
            calls = None
            if finish == "stop" and req.forced_tools:
                calls = tool_calls(text, req.tool_choice)
            elif finish == "stop" and req.auto_tools:
                calls = auto_tool_calls(text, req.tools)
                if calls and req.parallel_tool_calls is False:
                    calls = calls[:1]   # at most one call, as asked
            if calls:  # OpenAI's finish reason: "tool_calls" when the model chose, "stop" for a named function
                return {"role": "assistant", "content": None, "tool_calls": calls}, \
                    "stop" if isinstance(req.tool_choice, dict) else "tool_calls"
            return {"role": "assistant", "content": text}, finish

        async def events() -> AsyncIterator[str]:
            def chunk(i: int, delta: dict, finish: str | None = None, lp: dict | None = None) -> str:
                return R.sse(R.chat_chunk(request_id, created, served_model_name, delta, finish, lp,
                                          include_usage, i))

            for i in range(n):
                yield chunk(i, {"role": "assistant", "content": None if req.forced_tools else ""})
            # Forced tool calls are held and sent whole when they end; with "auto", a reply is held
            # once its first visible character opens JSON, else streamed as text from there.
            hold = ["hold" if req.forced_tools else "wait" if req.auto_tools else "stream" for _ in gens]
            held = [[] for _ in gens]

            def final(i: int, out) -> list[str]:
                """The chunks that end a held reply: its tool calls, or its text, and the finish."""
                message, finish = reply("".join(held[i]), out.finish_reason)
                if message.get("tool_calls"):
                    first = [chunk(i, {"tool_calls": [{"index": k, **c} for k, c in enumerate(message["tool_calls"])]})]
                else:
                    first = [chunk(i, {"content": message["content"]})] if message["content"] else []
                return first + [chunk(i, {}, finish)]

            try:
                async for i, out in _merged(gens):
                    lp = logprobs_of(out)
                    if hold[i] != "stream":
                        held[i].append(out.text)
                        if hold[i] == "wait":
                            start = "".join(held[i]).lstrip()
                            hold[i] = "wait" if not start else "hold" if start[0] in "{[" else "stream"
                        if hold[i] == "stream":   # it is text: what was held, then the rest as it comes
                            out = dataclasses.replace(out, text="".join(held[i]))
                        else:
                            if lp and lp["content"]:
                                yield chunk(i, {}, None, lp)
                            if out.finished:
                                for c in final(i, out):
                                    yield c
                            continue
                    if out.text or lp and lp["content"]:
                        yield chunk(i, {"content": out.text}, None, lp)
                    if out.finished:
                        yield chunk(i, {}, out.finish_reason)
            except EngineUnavailable as e:
                yield error_event(e)
            if include_usage and all(g.finish_reason for g in gens):
                yield R.sse(R.usage_chunk(request_id, created, served_model_name,
                                          "chat.completion.chunk", usage(gens, n)))
            yield R.sse("[DONE]")

        async def body() -> dict:
            text = [[] for _ in gens]
            entries = [[] for _ in gens]
            async for i, out in _merged(gens):
                text[i].append(out.text)
                entries[i] += out.logprobs or []
            return R.chat(request_id, created, served_model_name, [
                R.chat_choice(i, *reply("".join(text[i]), g.finish_reason),
                              R.chat_logprobs(entries[i], tokenizer) if req.logprobs else None)
                for i, g in enumerate(gens)], usage(gens, n))

        return await respond(request, gens, bool(req.stream), events, body)

    return app
