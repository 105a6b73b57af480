"""Prefill, decode and the host-side `generate` loop with streaming and stop handling."""
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Collection, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jllm.config import LlamaConfig
from jllm import costs, parallel, quant
from jllm.guided import Guided, follow, guide_tokenizer
from jllm.kvcache import KVCache, init_cache
from jllm.model import Params, logits, transformer
from jllm.plan import XLA_OPTIONS, Plan, check_impls, make_plan
from jllm.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, Logprob, Penalties, Sampling, logprob_entries, sample, top_logprobs
from jllm.streaming import Delta, Row  # noqa: F401 (Delta: the stream callback's argument)
from jllm.tokenizer import Tokenizer, check_text

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
    """One row's counts and host wall-clock timings, with this call's compilation kept apart.

    compile_s: seconds this call spent tracing, lowering and compiling programs (and loading them
    from the persistent compilation cache); 0.0 when every program was already compiled in this
    process. It is the same for every row of a call.
    ttft_s: seconds from the call to this row's first token on the host, less the compile time
    inside that span. A batch run in several parts (see `generate`) includes the earlier parts.
    decode_tokens_per_s: the tokens after the first, divided by the seconds from the first token
    to this row's last, less the compile time inside that span; 0.0 with fewer than two tokens.
    """
    prompt_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    compile_s: float
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
    # With generate(logprobs=N): one (token_id, logprob, [(alt_id, alt_logprob)] * N) per token
    # of `tokens`, and one more for the stop token when a stop id ended the row.
    logprobs: list[Logprob] | None = None


def bucket(n: int, minimum: int = MIN_BUCKET, buckets: Sequence[int] | None = None) -> int:
    """The padded length for n: the smallest of `buckets` that holds it, else the power of two
    >= n (at least `minimum`). Padding makes shapes repeat, so a new length rarely recompiles."""
    for b in buckets or ():
        if b >= n:
            return b
    return max(minimum, 1 << math.ceil(math.log2(max(n, 1))))


def _prefill(params: Params, tokens: jax.Array, n_tokens: jax.Array, cache: KVCache,
             sampling: Sampling, key: jax.Array, cfg: LlamaConfig, plan: Plan = Plan(),
             penalties: Penalties | None = None, logprobs: bool = False):
    h, cache = transformer(params, tokens, cache, cfg, plan, n_tokens=n_tokens, fresh=True,
                           only=(n_tokens - 1)[:, None])                      # [B, 1, D]
    raw = lg = logits(params, h[:, 0], plan)                                  # [B, V]
    if penalties is not None:  # static: the repetition penalty already sees the prompt
        lg = penalties.apply(lg)
    key, sub = jax.random.split(key)
    token = sample(lg, sub, sampling)
    if logprobs:  # static: under the model's distribution, before penalties and sampling's cuts
        return token, cache, key, top_logprobs(raw, token)
    return token, cache, key


# The prefill of float weights runs its GEMMs on cuBLAS rather than XLA's Triton GEMM fusions: TTFT
# at 2048 tokens 48.7 against 49.7 ms on an H200. Quantized weights keep the fusions, which fold the
# int8 dequantize into the GEMM (cuBLAS: 17.1 against 10.2 ms at 128 tokens; docs/PERFORMANCE.md),
# and XLA's dot merger (plan.XLA_OPTIONS; int8 TTFT at 128 / 2048 tokens 9.90 / 58.46 ms with it,
# 10.14 / 58.96 without).
FLOAT_PREFILL_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
_PREFILL = {quantized: jax.jit(_prefill, static_argnames=("cfg", "plan", "logprobs"), donate_argnames=("cache",),
                               compiler_options=None if quantized else {**XLA_OPTIONS, **FLOAT_PREFILL_OPTIONS})
            for quantized in (False, True)}


def prefill_program(params: Params):
    """The jitted prefill for these weights (see FLOAT_PREFILL_OPTIONS); a model's linear weights
    are all quantized or none (quant.quantize_flat)."""
    return _PREFILL[isinstance(params.layers[0].wq, quant.QArray)]


class _Prefill:
    """`prefill(params, tokens, n_tokens, cache, sampling, key, cfg=, plan=)`: run padded prompts
    tokens [B, T] (n_tokens [B] real) into an empty cache -> (first tokens [B], cache, key). Jitted
    (the cache is donated) by `prefill_program(params)`; `prefill.lower(...)` compiles ahead.
    With logprobs=True (static) a fourth result: `sampling.top_logprobs` of the first tokens."""

    def __call__(self, params: Params, *args, **kwargs) -> tuple[jax.Array, KVCache, jax.Array]:
        return prefill_program(params)(params, *args, **kwargs)

    def lower(self, params: Params, *args, **kwargs):
        return prefill_program(params).lower(params, *args, **kwargs)


prefill = _Prefill()


@functools.partial(jax.jit, static_argnames=("cfg", "n_steps", "plan", "logprobs"),
                   donate_argnames=("cache", "penalties"))
def decode(params: Params, token: jax.Array, cache: KVCache, sampling: Sampling, key: jax.Array,
           cfg: LlamaConfig, n_steps: int = 1, plan: Plan = Plan(), penalties: Penalties | None = None,
           logprobs: bool = False) -> tuple:
    """n_steps decode steps in one on-device loop: token [B] -> (tokens [B, n_steps], cache, key).

    With penalties (counting every generated token before `token`'s step, `token` not yet),
    the logits are penalized before sampling, and the updated penalties come back next.
    With logprobs=True (static), last: `sampling.top_logprobs` of each step's tokens under the
    model's distribution (before penalties), as [B, n_steps] and [B, n_steps, MAX_LOGPROBS]."""
    B = token.shape[0]

    def step(i, carry):
        token, cache, key, out, pen, lps = carry
        h, cache = transformer(params, token[:, None], cache, cfg, plan)      # [B, 1, D]
        key, sub = jax.random.split(key)
        raw = lg = logits(params, h[:, 0], plan)
        if pen is not None:  # static
            pen = pen.add(token)
            lg = pen.apply(lg)
        token = sample(lg, sub, sampling)                                    # [B]
        if lps is not None:  # static
            lps = tuple(a.at[:, i].set(b) for a, b in zip(lps, top_logprobs(raw, token)))
        return token, cache, key, out.at[:, i].set(token), pen, lps

    out = jnp.zeros((B, n_steps), jnp.int32)
    lps = None if not logprobs else (jnp.zeros((B, n_steps), jnp.float32),
                                     jnp.zeros((B, n_steps, MAX_LOGPROBS), jnp.int32),
                                     jnp.zeros((B, n_steps, MAX_LOGPROBS), jnp.float32))
    _, cache, key, out, penalties, lps = jax.lax.fori_loop(0, n_steps, step,
                                                           (token, cache, key, out, penalties, lps))
    return (out, cache, key) + (() if penalties is None else (penalties,)) + (() if lps is None else (lps,))


_BYTES = (bytes, bytearray, memoryview)


def _check_number(name: str, x, ok: Callable[[float], bool], expected: str, integer: bool = False) -> None:
    """TypeError unless x is a number (numpy scalars too; a bool is not); ValueError for a float
    where an int belongs, NaN, infinity, or a value without ok(x), naming what was `expected`."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name}={x!r} must be {'an int' if integer else 'a number'}, "
                        f"not {type(x).__name__}")
    if integer and not isinstance(x, (int, np.integer)):
        raise ValueError(f"{name}={x!r} must be an int")
    if not math.isfinite(x):
        raise ValueError(f"{name}={x!r} must be finite")
    if not ok(x):
        raise ValueError(f"{name}={x!r} must be {expected}")




def check_logit_bias(logit_bias, vocab_size: int) -> dict[int, float]:
    """A logit_bias: None, or a dict of at most MAX_LOGIT_BIAS token ids in [0, vocab_size) to
    biases in [-100, 100] (OpenAI's) -> the dict with int keys and float values."""
    if logit_bias is None:
        return {}
    if not isinstance(logit_bias, dict):
        raise TypeError(f"logit_bias={logit_bias!r:.80} must be a dict of token id -> bias")
    if len(logit_bias) > MAX_LOGIT_BIAS:
        raise ValueError(f"logit_bias has {len(logit_bias)} entries; at most {MAX_LOGIT_BIAS}")
    out = {}
    for t, b in logit_bias.items():
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
            raise ValueError(f"logit_bias key {t!r} must be a token id, an int in [0, {vocab_size})")
        _check_number(f"logit_bias[{t}]", b, lambda v: -100 <= v <= 100, "a number in [-100, 100]")
        out[int(t)] = float(b)
    return out


def check_logprobs(name: str, x) -> None:
    """logprobs (alternatives per token): None or an int in [0, MAX_LOGPROBS]."""
    if x is not None:
        _check_number(name, x, lambda v: 0 <= v <= MAX_LOGPROBS, f"None or an int in [0, {MAX_LOGPROBS}]",
                      integer=True)


def check_penalty(name: str, x) -> None:
    """presence_penalty and frequency_penalty: a number in [-2, 2], as OpenAI takes them;
    repetition_penalty: a number in [0.01, 100] (1: none; float32 keeps it finite and nonzero)."""
    if name == "repetition_penalty":
        _check_number(name, x, lambda v: 0.01 <= v <= 100, "a number in [0.01, 100] (1 is no penalty)")
    else:
        _check_number(name, x, lambda v: -2 <= v <= 2, "a number in [-2, 2]")


def _check_args(model: Model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                stop_token_ids, stream=None, presence_penalty=0.0, frequency_penalty=0.0,
                repetition_penalty=1.0, min_p=None) -> list[list[int]]:
    """Validate the public arguments; return the prompts as token ids."""
    if stream is not None and not callable(stream):
        raise TypeError(f"stream={stream!r:.80} must be a callable taking a Delta, or None")
    if not isinstance(model, Model):
        raise TypeError(f"model={model!r:.80} is a {type(model).__name__}, not a jllm Model: "
                        f"call model = jllm.load(path) first and pass that")
    if isinstance(prompts, _BYTES):
        raise TypeError(f"prompts is {type(prompts).__name__}; prompts must be str or token-id "
                        f"lists: decode bytes first, e.g. prompts.decode('utf-8')")
    def is_id(t) -> bool:  # an int or numpy int, never a bool
        return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))

    if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and all(map(is_id, prompts))):
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
            check_text(p, f"prompt {i}")
            ids.append(model.tokenizer.encode(p, bos=True))
        elif isinstance(p, _BYTES):
            raise TypeError(f"prompt {i} is {type(p).__name__}; prompts must be str or token-id "
                            f"lists: decode bytes first, e.g. .decode('utf-8')")
        elif isinstance(p, Sequence) and all(map(is_id, p)):
            if len(p) == 0:
                raise ValueError(f"prompt {i} is an empty token list")
            bad = [t for t in p if not 0 <= t < model.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token ids outside [0, {model.cfg.vocab_size}): {bad[:5]}")
            ids.append([int(t) for t in p])
        else:
            raise TypeError(f"prompt {i} must be a str or a list of int token ids; got {type(p).__name__}")
    _check_number("max_new_tokens", max_new_tokens, lambda x: x >= 1, "an int >= 1", integer=True)
    _check_number("temperature", temperature, lambda x: x >= 0, "a number >= 0")
    if top_k is not None:
        _check_number("top_k", top_k, lambda x: x >= 1, "None or an int >= 1", integer=True)
    if top_p is not None:
        _check_number("top_p", top_p, lambda x: 0 < x <= 1, "None or in (0, 1]")
    if min_p is not None:
        _check_number("min_p", min_p, lambda x: 0 <= x <= 1, "None or in [0, 1]")
    check_penalty("presence_penalty", presence_penalty)
    check_penalty("frequency_penalty", frequency_penalty)
    check_penalty("repetition_penalty", repetition_penalty)
    # The PRNG key keeps 32 bits: other seeds would repeat these (s < 0 is s + 2**32, as in the engine).
    _check_number("seed", seed, lambda x: -2**31 <= x < 2**32, "an int in [-2**31, 2**32)", integer=True)
    if stop is not None:
        if isinstance(stop, _BYTES) or not isinstance(stop, Collection):
            raise TypeError(f"stop={stop!r} must be a str or a list of str")
        for j, s in enumerate(stop):
            if not isinstance(s, str):
                raise TypeError(f"stop={stop!r}: stop string {j} is a {type(s).__name__}, not a str")
            if not s:
                raise ValueError(f"stop={stop!r}: stop string {j} is empty; stop strings must be non-empty")
            check_text(s, f"stop[{j}]")
    if stop and model.tokenizer is None:
        raise ValueError("stop strings need a tokenizer; this model has none (use stop_token_ids)")
    if stop_token_ids is not None:
        if isinstance(stop_token_ids, (str, *_BYTES)) or not isinstance(stop_token_ids, Collection):
            raise TypeError(f"stop_token_ids={stop_token_ids!r} must be a list of int token ids")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in stop_token_ids):
            raise ValueError(f"stop_token_ids={stop_token_ids!r} must be a list of ints")
    longest, max_new_tokens = max(len(p) for p in ids), int(max_new_tokens)  # a numpy int would wrap
    if longest + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(f"the longest prompt has {longest} tokens; with {max_new_tokens=} that needs "
                         f"{longest + max_new_tokens} positions, over the model's context of "
                         f"{model.cfg.max_seq_len} (max_seq_len)")
    return ids


def generate(model: Model, prompts: str | Sequence[str] | Sequence[Sequence[int]], *,
             max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, seed: int = 0, stop: str | Sequence[str] | None = None,
             stop_token_ids: Sequence[int] | None = None,
             stream: Callable[[Delta], None] | None = None, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
             logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
             min_p: float | None = None, guided: Guided | None = None) -> list[Completion]:
    """Generate a completion for each prompt (a str, a list of str, or a list of token-id lists).

    min_p (in [0, 1], as Hugging Face's and vLLM's): a sampled row keeps only tokens at least min_p
    times as likely as its most likely one (after temperature), with top-k and top-p.
    stop_token_ids=None stops on the tokenizer's EOS; [] never stops on a token. `stop` strings are
    matched on the decoded text and cut from it. `stream(delta)` receives text and ids as they come.
    presence_penalty / frequency_penalty (in [-2, 2], as OpenAI's): each token's logit is lowered
    by presence_penalty if the row has generated it already, and by frequency_penalty per time it
    has (the prompt does not count), before temperature, top-k and top-p, and before a greedy
    row's argmax. repetition_penalty (in [0.01, 100]; Hugging Face's): before those, the logit of every token
    in the prompt or generated already is divided by it when positive, multiplied when negative.
    logit_bias {token id: bias in [-100, 100]} (OpenAI's, at most 300): added to the logits
    first, before the penalties, as vLLM does (-100 bans a token, +100 all but forces it).
    logprobs N (an int in [0, 20]): each Completion's `logprobs` holds, per generated token (and
    for the stop token when a stop id ended the row), its log-probability and the N most likely
    tokens with theirs, under the model's distribution before penalties, bias, temperature,
    top-k and top-p (as the engine's); each streamed Delta carries its tokens' entries.
    guided (a `jllm.guided.Guided`: a JSON schema, any JSON object, a regex or a Lark grammar;
    needs a tokenizer and llguidance): every sampled token keeps each row's output a valid prefix
    of it, and a row stops ("stop") once its output is complete; EOS, allowed only then, always
    stops it. The decode loop then runs one step per host call (the next mask needs the last
    token), not DECODE_CHUNK.
    seed: an int in [0, 2**32) (a negative one is that plus 2**32). A batch whose KV cache would not fit the device's free memory runs
    in parts (the largest power-of-two number of prompts that fits, one after another); results
    keep the prompts' order and stream indices, and each part after the first samples from its own
    seed derived from `seed`.
    """
    t_call = time.perf_counter()
    if isinstance(stop, str):
        stop = [stop]
    ids = _check_args(model, prompts, max_new_tokens, temperature, top_k, top_p, seed, stop,
                      stop_token_ids, stream, presence_penalty, frequency_penalty, repetition_penalty, min_p)
    max_new_tokens, seed, temperature = int(max_new_tokens), int(seed) % 2**32, float(temperature)
    min_p = None if min_p is None else float(min_p)
    penalty = (float(presence_penalty), float(frequency_penalty), float(repetition_penalty))
    logit_bias = check_logit_bias(logit_bias, model.cfg.vocab_size)
    check_logprobs("logprobs", logprobs)
    if guided is not None:
        if not isinstance(guided, Guided):
            raise TypeError(f"guided={guided!r:.80} must be a jllm.guided.Guided (Guided.json_schema(...), "
                            ".json_object(), .regex(...), .lark(...)) or None")
        if model.tokenizer is None:
            raise ValueError(f"guided={guided.kind} needs a tokenizer; this model has none")
        view = guide_tokenizer(model.tokenizer, model.cfg.vocab_size)
        view.matcher(guided)   # a bad grammar fails here, before anything runs
    top_k = None if top_k is None else int(top_k)
    top_p = None if top_p is None else float(top_p)
    stop = list(stop or [])
    if stop_token_ids is None:
        stop_token_ids = list(model.tokenizer.stop_ids) if model.tokenizer is not None else []
    stop_ids = {int(t) for t in stop_token_ids} | (set(model.tokenizer.stop_ids) if guided is not None else set())
    cfg, n = model.cfg, len(ids)
    dp = 1 if model.mesh is None else parallel.data_size(model.mesh)  # the batch split over data
    T = bucket(max(map(len, ids)), buckets=model.prompt_buckets)
    S = min(bucket(T + max_new_tokens + DECODE_CHUNK), cfg.max_seq_len)
    T = min(T, S)
    per_run = _prompts_per_run(model, n, T, S, dp)
    B = _padded_batch(per_run, dp)
    results: list[Completion] = []
    with parallel.mesh_context(model.mesh), costs.CompileClock() as clock:
        for part, first in enumerate(range(0, n, per_run)):
            part_ids = ids[first:first + per_run]
            tokens = np.zeros((B, T), np.int32)
            n_tokens = np.ones((B,), np.int32)  # padding rows hold one token and are ignored
            for i, p in enumerate(part_ids):
                tokens[i, :len(p)], n_tokens[i] = p, len(p)
            sampling = Sampling.make(B, temperature, top_k, top_p, min_p)
            rows = [Row(i, p, model.tokenizer, stop, stop_ids, max_new_tokens) for i, p in enumerate(part_ids)]
            penalties = None if penalty == (0.0, 0.0, 1.0) and not logit_bias and guided is None else \
                Penalties.make(part_ids, B, cfg.vocab_size, *penalty, logit_bias)
            matchers = None if guided is None else [view.matcher(guided) for _ in part_ids]
            results += _run(model, rows, tokens, n_tokens, S, sampling, _part_seed(seed, part),
                            max_new_tokens, _shifted(stream, first), t_call, clock, penalties,
                            None if logprobs is None else int(logprobs), matchers)
    for c in results:  # a later part may have compiled too
        c.stats.compile_s = clock.seconds()
    return results


def _padded_batch(n: int, dp: int = 1) -> int:
    """The batch size that runs n prompts: a power of two, rounded up to a multiple of dp."""
    return -(-bucket(n, minimum=1) // dp) * dp


def _run_bytes(model: Model, B: int, T: int, S: int) -> int:
    """Device memory (one device's part on a mesh) that a run of batch B needs beyond the weights."""
    n_devices = 1 if model.mesh is None else model.mesh.size
    return (costs.cache_bytes(model.cfg, B, S, model.cache_dtype, model.mesh)
            + costs.prefill_bytes(model.cfg, B, T, model.dtype, model.attn_impl, n_devices))


def _prompts_per_run(model: Model, n: int, T: int, S: int, dp: int) -> int:
    """How many of the n prompts one run takes so that it fits the device's free memory."""
    budget = costs.free_device_bytes(model.mesh)
    rows = costs.rows_that_fit(n, lambda k: _run_bytes(model, _padded_batch(k, dp), T, S), budget)
    if rows:
        return rows
    cache = costs.cache_bytes(model.cfg, _padded_batch(1, dp), S, model.cache_dtype, model.mesh)
    if cache > budget:
        raise ValueError(f"one prompt needs {cache / 2**30:.3f} GiB of KV cache for {S} positions, "
                         f"more than the {budget / 2**30:.3f} GiB of device memory it may use: "
                         f"shorten the prompt or max_new_tokens, or load with kv_cache_dtype='int8'")
    return 1  # the cache fits; the rough prefill estimate alone does not refuse a run


def _part_seed(seed: int, part: int) -> int:
    """The seed of part `part` of a split batch: `seed` for the first, then distinct derived ones."""
    return seed if part == 0 else int(np.random.SeedSequence([seed, part]).generate_state(1)[0])


def _shifted(stream: Callable[[Delta], None] | None, first: int) -> Callable[[Delta], None] | None:
    """`stream` for a part whose rows start at prompt `first`: deltas carry the prompt's index."""
    if stream is None or first == 0:
        return stream
    return lambda d: stream(dataclasses.replace(d, index=d.index + first))


def _row_stats(row: Row, t_call: float, t_first: float, clock: costs.CompileClock) -> Stats:
    """A finished row's Stats, with compile time taken out of its spans (see `Stats`)."""
    t_done = row.t_done or t_first
    decode_s = t_done - t_first - clock.seconds(t_first, t_done)
    n = len(row.tokens)
    rate = (n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0
    return Stats(len(row.prompt), n, t_first - t_call - clock.seconds(t_call, t_first), rate,
                 clock.seconds())


def _run(model: Model, rows: list[Row], tokens: np.ndarray, n_tokens: np.ndarray, S: int,
         sampling: Sampling, seed: int, max_new_tokens: int, stream, t_call: float,
         clock: costs.CompileClock, penalties: Penalties | None = None,
         n_logprobs: int | None = None, matchers: list | None = None) -> list[Completion]:
    """The device part of `generate`: prefill, then decode chunks until every row is finished
    (with matchers, one guided step per host call, each row's packed grammar mask in
    Penalties.allowed)."""
    cfg, B = model.cfg, tokens.shape[0]
    want_lp = n_logprobs is not None
    kw = dict(cfg=cfg, plan=model.plan, logprobs=want_lp)
    row_lps: list[list[Logprob]] = [[] for _ in rows]

    def take(new_tokens: np.ndarray, lps=None) -> None:
        """new_tokens [B, K] from the device; lps: their top_logprobs on the host, or None."""
        now = time.perf_counter()
        for row in rows:
            if row.finish is None:
                i, new = row.index, new_tokens[row.index].tolist()
                delta = row.push(new, now)
                if lps is not None:  # the entries of the tokens the row took, a stop token included
                    k = row.taken
                    entries = logprob_entries(new_tokens[i, :k], lps[0][i, :k], lps[1][i, :k], lps[2][i, :k],
                                              n_logprobs)
                    row_lps[i] += entries
                    if entries:
                        delta = dataclasses.replace(delta or Delta(i, "", []), logprobs=entries)
                if matchers is not None:
                    delta = follow(row, matchers[i], new, now, delta)
                if delta is not None and stream is not None:
                    stream(delta)

    def allowed_words() -> np.ndarray:
        """[B, ceil(V / 32)] uint32: each unfinished row's grammar mask, packed; all ones else."""
        words = np.full((B, -(-cfg.vocab_size // 32)), 0xFFFFFFFF, np.uint32)
        for row in rows:
            if row.finish is None:
                words[row.index] = matchers[row.index].words()
        return words

    def lp_host(lps):
        return None if lps is None else tuple(host(x) for x in lps)

    key = jax.random.key(seed)
    if matchers is not None:   # the first tokens' masks, placed with the rest below
        penalties = dataclasses.replace(penalties, allowed=allowed_words())
    if model.mesh is None:
        cache = init_cache(cfg, B, S, model.cache_dtype)
        tokens_d, n_tokens_d, host, place = jnp.asarray(tokens), jnp.asarray(n_tokens), np.asarray, jnp.asarray
        penalties = None if penalties is None else jax.tree.map(jnp.asarray, penalties)
    else:
        cache = parallel.init_cache(cfg, B, S, model.cache_dtype, model.mesh)
        # Global arrays with the batch over the data axis: in a multi-process run every process
        # holds the same host inputs and contributes its devices' part; results come back whole.
        tokens_d, n_tokens_d, sampling, key, penalties = parallel.put_batch(
            (tokens, n_tokens, sampling, key, penalties), model.mesh)
        host = parallel.to_host

        def place(x):
            return parallel.put_batch(x, model.mesh)
    token, cache, key, *lps = prefill(model.params, tokens_d, n_tokens_d, cache, sampling, key,
                                      penalties=penalties, **kw)
    take(host(token)[:, None], tuple(x[:, None] for x in lp_host(lps[0])) if lps else None)
    t_first = time.perf_counter()
    while matchers is not None and any(r.finish is None for r in rows):   # one step at a time
        penalties = dataclasses.replace(penalties, allowed=place(allowed_words()))
        out, cache, key, penalties, *rest = decode(model.params, token, cache, sampling, key, n_steps=1,
                                                   penalties=penalties, **kw)
        token = out[:, -1]
        take(host(out), lp_host(rest[0]) if rest else None)
    # Keep one decode chunk in flight: the next is dispatched before the last one is read back.
    pending, steps = None, 1
    while steps < max_new_tokens and any(r.finish is None for r in rows):
        out, cache, key, *rest = decode(model.params, token, cache, sampling, key, n_steps=DECODE_CHUNK,
                                        penalties=penalties, **kw)
        if penalties is not None:
            penalties = rest.pop(0)
        token, steps = out[:, -1], steps + DECODE_CHUNK
        if pending is not None:
            take(host(pending[0]), lp_host(pending[1]))
        pending = out, rest[0] if rest else None
    if pending is not None and any(r.finish is None for r in rows):
        take(host(pending[0]), lp_host(pending[1]))
    results = []
    for row in rows:
        if row.finish is None:  # cannot happen: max_new_tokens steps always ran
            raise RuntimeError(f"row {row.index} did not finish")
        results.append(Completion(row.tokens, row.text, row.finish, _row_stats(row, t_call, t_first, clock),
                                  row_lps[row.index] if want_lp else None))
    return results
