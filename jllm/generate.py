"""Prefill, decode and the host-side `generate` loop with streaming and stop handling."""
import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jllm.config import LlamaConfig
from jllm.kvcache import KVCache, init_cache
from jllm.model import Params, logits, transformer
from jllm.plan import Plan, check_impls, make_plan
from jllm.sampling import Sampling, sample
from jllm.tokenizer import Tokenizer

DECODE_CHUNK = 8       # decode steps fused into one on-device loop per host call
MIN_BUCKET = 16        # shortest padded prompt length



def check_kv_cache_dtype(kv_cache_dtype) -> None:
    """None (the weights' dtype) or "int8". A float cache of another dtype than the weights would
    meet the bf16 queries in mixed-dtype dots, which the Triton kernels do not take."""
    if kv_cache_dtype is not None and kv_cache_dtype != "int8":
        raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}; expected None (the weights' dtype) or 'int8'")


@dataclasses.dataclass
class Model:
    """What `jllm.load` returns: weights, architecture, tokenizer and the kernels to use."""
    params: Params
    cfg: LlamaConfig
    tokenizer: Tokenizer | None = None
    attn_impl: str = "xla"
    matmul_impl: str = "xla"
    quant: str | None = None  # "int8" | "int4" | None, as stored in the checkpoint
    mesh: jax.sharding.Mesh | None = None
    # Padded prompt lengths; None means powers of two from MIN_BUCKET. Each bucket compiles once.
    prompt_buckets: tuple[int, ...] | None = None
    # KV cache dtype: None is the weights' dtype; "int8" stores codes and per-token, per-head scales.
    kv_cache_dtype: str | None = None

    def __post_init__(self):
        check_kv_cache_dtype(self.kv_cache_dtype)
        check_impls(self.attn_impl, self.matmul_impl)
        if self.prompt_buckets is not None:
            b = self.prompt_buckets
            if not b or any(not isinstance(x, int) or x < 1 for x in b) or list(b) != sorted(set(b)):
                raise ValueError(f"prompt_buckets={b!r} must be increasing positive ints")

    @property
    def plan(self) -> Plan:
        """The static plan the jitted steps run with: kernels, mesh and KV-head rule."""
        return make_plan(self.cfg, self.mesh, self.attn_impl, self.matmul_impl)

    @property
    def dtype(self):
        return self.params.norm.dtype

    @property
    def cache_dtype(self):
        return self.dtype if self.kv_cache_dtype is None else jnp.dtype(self.kv_cache_dtype)


@dataclasses.dataclass
class Stats:
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float                # time to first token, from the call to the first token on the host
    decode_tokens_per_s: float   # tokens after the first, per second, for this row
    # Speculative decoding only (None without it), per target verification step of this row:
    draft_tokens_per_step: float | None = None  # drafted tokens checked
    acceptance: float | None = None             # accepted / drafted
    tokens_per_step: float | None = None        # tokens the step produced (accepted + 1)
    target_steps: int | None = None             # verification steps


@dataclasses.dataclass
class Completion:
    tokens: list[int]            # generated ids only (a stop token is not included)
    text: str | None             # None when the model has no tokenizer
    finish_reason: str           # "stop" or "length"
    stats: Stats


@dataclasses.dataclass
class Delta:
    """One streaming event: new text (never a split character) and the new token ids of a row."""
    index: int
    text: str
    token_ids: list[int]


def bucket(n: int, minimum: int = MIN_BUCKET, buckets: Sequence[int] | None = None) -> int:
    """The padded length for n: the smallest of `buckets` that holds it, else the power of two
    >= n (at least `minimum`). Padding makes shapes repeat, so a new length rarely recompiles."""
    for b in buckets or ():
        if b >= n:
            return b
    return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


@functools.partial(jax.jit, static_argnames=("cfg", "plan"), donate_argnames=("cache",))
def prefill(params: Params, tokens: jax.Array, n_tokens: jax.Array, cache: KVCache,
            sampling: Sampling, key: jax.Array, cfg: LlamaConfig, plan: Plan = Plan(),
            ) -> tuple[jax.Array, KVCache, jax.Array]:
    """Run padded prompts tokens [B, T] (n_tokens [B] real) into an empty cache -> first tokens [B]."""
    h, cache = transformer(params, tokens, cache, cfg, plan, n_tokens=n_tokens, fresh=True)  # [B, T, D]
    last = h[jnp.arange(tokens.shape[0]), n_tokens - 1]                       # [B, D]
    key, sub = jax.random.split(key)
    return sample(logits(params, last, plan), sub, sampling), cache, key


@functools.partial(jax.jit, static_argnames=("cfg", "n_steps", "plan"), donate_argnames=("cache",))
def decode(params: Params, token: jax.Array, cache: KVCache, sampling: Sampling, key: jax.Array,
           cfg: LlamaConfig, n_steps: int = 1, plan: Plan = Plan(),
           ) -> tuple[jax.Array, KVCache, jax.Array]:
    """n_steps decode steps in one on-device loop: token [B] -> tokens [B, n_steps]."""
    def step(i, carry):
        token, cache, key, out = carry
        h, cache = transformer(params, token[:, None], cache, cfg, plan)      # [B, 1, D]
        key, sub = jax.random.split(key)
        token = sample(logits(params, h[:, 0], plan), sub, sampling)         # [B]
        return token, cache, key, out.at[:, i].set(token)

    out = jnp.zeros((token.shape[0], n_steps), jnp.int32)
    _, cache, key, out = jax.lax.fori_loop(0, n_steps, step, (token, cache, key, out))
    return out, cache, key


def _check_args(model: Model, prompts, max_new_tokens, temperature, top_k, top_p, stop,
                stop_token_ids) -> list[list[int]]:
    """Validate the public arguments; return the prompts as token ids."""
    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts
                                    and all(isinstance(t, (int, np.integer)) for t in prompts)):
        prompts = [prompts]
    if not isinstance(prompts, Sequence) or isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"prompts must be a str or a non-empty list of str or of token-id lists; got {prompts!r}")
    ids = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            if not p:
                raise ValueError(f"prompt {i} is an empty string")
            if model.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass prompts as lists of token ids")
            ids.append(model.tokenizer.encode(p, bos=True))
        elif isinstance(p, Sequence) and all(isinstance(t, (int, np.integer)) for t in p):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is an empty token list")
            bad = [t for t in p if not 0 <= t < model.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {model.cfg.vocab_size}): {bad[:5]}")
            ids.append([int(t) for t in p])
        else:
            raise TypeError(f"prompt {i} must be a str or a list of int token ids; got {type(p).__name__}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r} must be an int >= 1")
    if not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise ValueError(f"temperature={temperature!r} must be a number >= 0")
    if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k={top_k!r} must be None or an int >= 1")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r} must be None or in (0, 1]")
    if stop is not None and (not all(isinstance(s, str) and s for s in stop)):
        raise ValueError(f"stop={stop!r} must be a list of non-empty strings")
    if stop and model.tokenizer is None:
        raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
    if stop_token_ids is not None and not all(isinstance(t, (int, np.integer)) for t in stop_token_ids):
        raise ValueError(f"stop_token_ids={stop_token_ids!r} must be a list of ints")
    longest = max(len(p) for p in ids)
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"the longest prompt has {longest} tokens; with {max_new_tokens=} that needs "
                         f"{longest + max_new_tokens} positions, over the model's context of "
                         f"{model.cfg.max_seq_len} (max_seq_len)")
    return ids


class _Row:
    """Host-side state of one prompt: tokens so far, stop checks, streamed text."""

    def __init__(self, index: int, prompt: list[int], model: Model, stop: list[str],
                 stop_ids: set[int], max_new: int):
        self.index, self.prompt, self.stop, self.stop_ids, self.max_new = index, prompt, stop, stop_ids, max_new
        self.tok = model.tokenizer
        self.tokens: list[int] = []
        self.finish: str | None = None
        self.text = "" if self.tok is not None else None
        self.emitted = 0
        self.t_done = 0.0

    def _decoded(self) -> str:
        return self.tok.decode_after(self.prompt[-1], self.tokens)

    def push(self, new: list[int], now: float) -> Delta | None:
        """Take new token ids; return what to stream (or None), marking the row finished.

        With stop strings the text is checked after every token, so `.tokens` ends at the token
        that completed the stop string and nothing generated after it is kept.
        """
        start = len(self.tokens)
        text = None
        for t in new:
            if t in self.stop_ids:
                self.finish = "stop"
                break
            self.tokens.append(t)
            if self.stop:
                text = self._decoded()
                cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
                if cut >= 0:
                    text, self.finish = text[:cut], "stop"
                    break
            if len(self.tokens) >= self.max_new:
                self.finish = "length"
                break
        if self.finish:
            self.t_done = now
        fresh = self.tokens[start:]
        if self.tok is None:
            return Delta(self.index, "", fresh) if fresh else None
        if text is None:
            text = self._decoded()
        if self.finish:
            stable = len(text)
        else:  # hold back a split character and anything that may begin a stop string
            stable = len(text.rstrip("\ufffd"))
            hold = max((n for s in self.stop for n in range(1, min(len(s), stable + 1))
                        if text[:stable].endswith(s[:n])), default=0)
            stable -= hold
        self.text = text
        delta = text[self.emitted:stable]
        self.emitted = max(self.emitted, stable)
        return Delta(self.index, delta, fresh) if (delta or fresh) else None


def generate(model: Model, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop: str | Sequence[str] | None = None,
             stop_token_ids: Sequence[int] | None = None,
             stream: Callable[[Delta], None] | None = None,
             speculative=None) -> list[Completion]:
    """Generate a completion for each prompt (a str, a list of str, or a list of token-id lists).

    stop_token_ids=None stops on the tokenizer's EOS; [] never stops on a token. `stop` strings are
    matched on the decoded text and cut from it. `stream(delta)` receives text and ids as they come.
    speculative: a `jllm.speculative.Speculative` (a proposer and k) drafts and verifies k tokens
    per target step; greedy output is unchanged and sampled output keeps its distribution.
    """
    if speculative is not None:
        from jllm import speculative as spec  # it imports this module
        return spec.generate(model, prompts, speculative, max_new_tokens=max_new_tokens,
                             temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop,
                             stop_token_ids=stop_token_ids, stream=stream)
    t_call = time.perf_counter()
    if isinstance(stop, str):
        stop = [stop]
    ids = _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, stop, stop_token_ids)
    stop = list(stop or [])
    if stop_token_ids is None:
        stop_token_ids = [model.tokenizer.eos_id] if model.tokenizer is not None else []
    cfg, n = model.cfg, len(ids)
    B = bucket(n, minimum=1)
    if model.mesh is not None:  # the batch is split over the mesh's data axis
        from jllm import parallel
        dp = parallel.data_size(model.mesh)
        B = -(-B // dp) * dp
    T = bucket(max(map(len, ids)), buckets=model.prompt_buckets)
    S = min(bucket(T + max_new_tokens + DECODE_CHUNK), cfg.max_seq_len)
    T = min(T, S)
    tokens = np.zeros((B, T), np.int32)
    n_tokens = np.ones((B,), np.int32)  # padding rows hold one token and are ignored
    for i, p in enumerate(ids):
        tokens[i, :len(p)], n_tokens[i] = p, len(p)
    sampling = Sampling.make(B, temperature, top_k, top_p)
    rows = [_Row(i, p, model, stop, set(stop_token_ids), max_new_tokens) for i, p in enumerate(ids)]
    with _on_mesh(model.mesh):
        return _run(model, rows, tokens, n_tokens, S, sampling, seed, max_new_tokens, stream, t_call)


def _on_mesh(mesh):
    if mesh is None:
        return contextlib.nullcontext()
    from jllm import parallel  # sharded runs only
    return parallel.mesh_context(mesh)


def _run(model: Model, rows: list[_Row], tokens: np.ndarray, n_tokens: np.ndarray, S: int,
         sampling: Sampling, seed: int, max_new_tokens: int, stream, t_call: float) -> list[Completion]:
    """The device part of `generate`: prefill, then decode chunks until every row is finished."""
    cfg, B = model.cfg, tokens.shape[0]
    kw = dict(cfg=cfg, plan=model.plan)

    def take(new_tokens: np.ndarray) -> None:
        now = time.perf_counter()
        for row in rows:
            if row.finish is None:
                delta = row.push(new_tokens[row.index].tolist(), now)
                if delta is not None and stream is not None:
                    stream(delta)

    key = jax.random.key(seed)
    if model.mesh is None:
        cache = init_cache(cfg, B, S, model.cache_dtype)
        tokens_d, n_tokens_d, host = jnp.asarray(tokens), jnp.asarray(n_tokens), np.asarray
    else:
        from jllm import parallel
        cache = parallel.init_cache(cfg, B, S, model.cache_dtype, model.mesh)
        # Global arrays with the batch over the data axis: in a multi-process run every process
        # holds the same host inputs and contributes its devices' part; results come back whole.
        tokens_d, n_tokens_d, sampling, key = parallel.put_batch(
            (tokens, n_tokens, sampling, key), model.mesh)
        host = parallel.to_host
    token, cache, key = prefill(model.params, tokens_d, n_tokens_d, cache, sampling, key, **kw)
    take(host(token)[:, None])
    t_first = time.perf_counter()
    # Keep one decode chunk in flight: the next is dispatched before the last one is read back.
    pending, steps = None, 1
    while steps < max_new_tokens and any(r.finish is None for r in rows):
        out, cache, key = decode(model.params, token, cache, sampling, key, n_steps=DECODE_CHUNK, **kw)
        token, steps = out[:, -1], steps + DECODE_CHUNK
        if pending is not None:
            take(host(pending))
        pending = out
    if pending is not None and any(r.finish is None for r in rows):
        take(host(pending))
    results = []
    for row in rows:
        if row.finish is None:  # cannot happen: max_new_tokens steps always ran
            raise RuntimeError(f"row {row.index} did not finish")
        t_done = row.t_done or t_first
        rate = (len(row.tokens) - 1) / (t_done - t_first) if len(row.tokens) > 1 and t_done > t_first else 0.0
        stats = Stats(len(row.prompt), len(row.tokens), t_first - t_call, rate)
        results.append(Completion(row.tokens, row.text, row.finish, stats))
    return results
