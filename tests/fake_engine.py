"""A stand-in for jllm.engine with its Python API, built on jllm.generate (for the server tests).

`install()` makes `import jllm.engine` find this module while the real engine is absent. Each
admitted request is generated whole by jllm.generate when it is scheduled, then handed out one
token per step() through jllm.generate's own streaming rules, so deltas never split a character
or show a possible stop string. Pages are counted as a paged cache would hold them.
"""
import dataclasses
import functools
import math
import sys
import time
import uuid
from collections import deque

import jax
import jax.numpy as jnp
import numpy as np

import jllm
from jllm.generate import _Row, bucket
from jllm.model import forward, init_cache


class QueueFull(RuntimeError):
    """add_request when max_queue requests are already waiting."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    logprobs: int | None = None


@dataclasses.dataclass
class RequestMetrics:
    queue_s: float
    ttft_s: float
    decode_tokens_per_s: float
    cached_prompt_tokens: int


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    text: str
    token_ids: list[int]
    finished: bool
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    logprobs: list | None
    metrics: RequestMetrics | None


@dataclasses.dataclass
class EngineStats:
    running: int
    waiting: int
    pages_used: int
    pages_total: int
    prefix_hit_tokens: int
    prompt_tokens: int
    generated_tokens: int
    aborted: int
    kv_cache_usage: float
    prefix_cache_hit_ratio: float


@dataclasses.dataclass
class _Request:
    rid: str
    ids: list[int]
    params: SamplingParams
    t_added: float
    steps: list = dataclasses.field(default_factory=list)   # (text, [token], logprob entry)
    finish_reason: str | None = None
    sent: int = 0
    t_first: float = 0.0


@functools.partial(jax.jit, static_argnames=("cfg",))
def _logits(params, tokens, cache, cfg):
    return forward(params, tokens, cache, cfg)[0]


class Engine:
    def __init__(self, model, max_seqs=64, page_size=16, num_pages=None, memory_fraction=0.9,
                 max_tokens_per_step=512, kv_cache_dtype=None, prefix_caching=True,
                 max_queue=None, progress=True, step_delay_s: float = 0.0):
        self.model, self.max_seqs, self.page_size = model, max_seqs, page_size
        self.num_pages = num_pages or 4096
        self.max_queue, self.step_delay_s = max_queue, step_delay_s
        self.waiting: deque[_Request] = deque()
        self.running: dict[str, _Request] = {}
        self.aborted: list[_Request] = []
        self.counters = dict(prompt_tokens=0, generated_tokens=0, aborted=0)
        self.steps = 0

    def add_request(self, prompt, params: SamplingParams, request_id: str | None = None) -> str:
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        tok = self.model.tokenizer
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            ids = tok.encode(prompt, bos=True)
        elif isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            if not prompt:
                raise ValueError("the prompt is an empty token list")
            ids = list(prompt)
        else:
            raise TypeError(f"prompt must be a str or a list of ints, got {type(prompt).__name__}")
        if len(ids) + params.max_tokens > self.model.cfg.max_seq_len:
            raise ValueError(f"prompt of {len(ids)} tokens + max_tokens={params.max_tokens} is over "
                             f"the context of {self.model.cfg.max_seq_len}")
        if self.max_queue is not None and len(self.waiting) >= self.max_queue:
            raise QueueFull(f"{len(self.waiting)} requests waiting (max_queue={self.max_queue})")
        rid = request_id or uuid.uuid4().hex
        self.waiting.append(_Request(rid, ids, params, time.perf_counter()))
        return rid

    def abort(self, request_id: str) -> None:
        for req in list(self.waiting):
            if req.rid == request_id:
                self.waiting.remove(req)
                self.aborted.append(req)
        if request_id in self.running:
            self.aborted.append(self.running.pop(request_id))

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.aborted)

    def _pages(self, req: _Request) -> int:
        return math.ceil((len(req.ids) + req.sent) / self.page_size)

    def stats(self) -> EngineStats:
        used = sum(self._pages(r) for r in self.running.values())
        return EngineStats(running=len(self.running), waiting=len(self.waiting), pages_used=used,
                           pages_total=self.num_pages, prefix_hit_tokens=0,
                           kv_cache_usage=used / self.num_pages, prefix_cache_hit_ratio=0.0,
                           **self.counters)

    def _output(self, req: _Request, text: str, tokens: list[int], logprobs, finish: str | None):
        metrics = None
        if finish is not None:
            now = time.perf_counter()
            metrics = RequestMetrics(0.0, (req.t_first or now) - req.t_added, 0.0, 0)
        return RequestOutput(req.rid, text, tokens, finish is not None, finish, len(req.ids),
                             req.sent, logprobs, metrics)

    def _schedule(self, req: _Request) -> None:
        """Generate the whole completion now; step() hands it out one token at a time."""
        p, model = req.params, self.model
        [out] = jllm.generate(model, [req.ids], max_new_tokens=p.max_tokens,
                              temperature=p.temperature, top_k=p.top_k, top_p=p.top_p,
                              seed=p.seed, stop=list(p.stop) or None,
                              stop_token_ids=None if p.stop_token_ids is None else list(p.stop_token_ids))
        logprobs = _logprobs(model, req.ids, out.tokens, p.logprobs) if p.logprobs is not None else None
        row = _Row(0, req.ids, model, list(p.stop), set(), len(out.tokens) or 1)
        for i, t in enumerate(out.tokens):
            delta = row.push([t], 0.0)
            text = delta.text if delta is not None else ""
            req.steps.append((text, [t], None if logprobs is None else [logprobs[i]]))
        rest = (out.text or "")[row.emitted:]
        if req.steps:
            text, tokens, lp = req.steps[-1]
            req.steps[-1] = (text + rest, tokens, lp)
        else:
            req.steps.append((rest, [], None if logprobs is None else []))
        req.finish_reason = out.finish_reason
        self.counters["prompt_tokens"] += len(req.ids)

    def step(self) -> list[RequestOutput]:
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        self.steps += 1
        outs = []
        for req in self.aborted:
            self.counters["aborted"] += 1
            outs.append(self._output(req, "", [], [] if req.params.logprobs is not None else None, "abort"))
        self.aborted = []
        while self.waiting and len(self.running) < self.max_seqs:
            req = self.waiting.popleft()
            self._schedule(req)
            self.running[req.rid] = req
        for rid, req in list(self.running.items()):
            text, tokens, lp = req.steps[req.sent]
            req.sent += 1
            self.counters["generated_tokens"] += len(tokens)
            if req.sent == 1:
                req.t_first = time.perf_counter()
            done = req.sent == len(req.steps)
            outs.append(self._output(req, text, tokens, lp, req.finish_reason if done else None))
            if done:
                del self.running[rid]
        return outs


def _logprobs(model, prompt: list[int], tokens: list[int], top_n: int) -> list:
    """Per generated token: (id, log p, [(alt id, log p), ...top_n]) from one full forward."""
    seq = prompt + tokens
    S = bucket(len(seq), minimum=64)
    padded = np.zeros((1, S), np.int32)
    padded[0, :len(seq)] = seq
    cache = init_cache(model.cfg, 1, S, model.dtype)
    logits = np.asarray(_logits(model.params, jnp.asarray(padded), cache, model.cfg))[0]      # [S, V]
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    out = []
    for i, t in enumerate(tokens):
        row = logp[len(prompt) - 1 + i]
        top = np.argsort(-row)[:top_n]
        out.append((t, float(row[t]), [(int(a), float(row[a])) for a in top]))
    return out


def install() -> None:
    """Let `import jllm.engine` find this module when the real engine is not there."""
    try:
        import jllm.engine  # noqa: F401
    except ImportError:
        sys.modules["jllm.engine"] = sys.modules[__name__]
