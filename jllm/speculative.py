"""Speculative decoding: a proposer drafts k tokens per row; the target checks k+1 positions in one step.

Proposers: `DraftModel` (another jllm model with the same vocabulary, or the target's own weights
quantized in memory: `self_draft`) and `PromptLookup` (n-gram matches in the prompt and output,
on the host). One round, with the target cache holding every token but the last (`last` [B]):

    drafts, q, m, state, key = proposer.propose(state, contexts, sampling, key, k)
    out, n, last, cache, key = verify(params, last, drafts, m, q, active, cache, sampling, key, ...)
    state = proposer.commit(state, out, n, active)

drafts [B, k], q [B, k, V] (the draft's probabilities; None when the drafts are deterministic),
m [B] usable drafts per row. `verify` runs [last, d1..dk] through the target over the cache (the
chunked-prefill path), accepts n [B] <= m drafts per row and appends one target token:
out[b, :n[b] + 1] are the row's new tokens. The cache length moves to the accepted prefix; the
entries past it are stale (never read, overwritten by the next write), which is the whole rollback.

The host loop keeps a draft model's rounds one ahead: round r + 1 is dispatched before round r's
tokens are read back, so the GPU does not idle while the host reads and launches (a row that ended
in round r runs round r + 1 too; its tokens are dropped). Prompt lookup drafts from the host's
tokens, so its rounds wait for each other.

Greedy rows accept the longest prefix equal to the target's argmax. Sampled rows use the rejection
rule of Leviathan et al. 2023 and Chen et al. 2023 over the same tempered, top-k/top-p filtered
distributions as `jllm.sampling`, so the output is distributed exactly as the target's.

Over 400 lines: the three proposers, the verify step, both acceptance rules and the host loop
belong together (one round is one read of this file).
"""
import dataclasses
import functools
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import jax
import jax.numpy as jnp
import numpy as np

from jllm import quant
from jllm.config import LlamaConfig
from jllm import costs
from jllm.generate import Completion, Delta, Model, Stats, _check_args, bucket, prefill
from jllm.streaming import Row
from jllm.kvcache import KVCache, init_cache
from jllm.model import Params, from_flat, logits, to_flat, transformer
from jllm.plan import XLA_OPTIONS, Plan
from jllm.sampling import Sampling, _filtered_logits  # the exact filtering `sample` applies

Rule = Callable[..., tuple[jax.Array, jax.Array]]


# --- Acceptance ------------------------------------------------------------------------------------

def rejection(p: jax.Array, q: jax.Array, drafts: jax.Array, m: jax.Array, key: jax.Array,
              ) -> tuple[jax.Array, jax.Array]:
    """The exact rule: p [B, k+1, V] target and q [B, k, V] draft probabilities, drafts [B, k],
    m [B] -> accepted n [B] and the token after them [B].

    Draft i is accepted with probability min(1, p_i(d_i) / q_i(d_i)); at the first rejection the
    token is drawn from the normalised max(0, p_n - q_n); after m acceptances from p_m.
    """
    B, k = drafts.shape
    k_accept, k_token = jax.random.split(key)
    p_d = jnp.take_along_axis(p[:, :k], drafts[..., None], axis=-1)[..., 0]          # [B, k]
    q_d = jnp.take_along_axis(q, drafts[..., None], axis=-1)[..., 0]                 # [B, k]
    u = jax.random.uniform(k_accept, (B, k))
    ok = (u * q_d < p_d) & (jnp.arange(k) < m[:, None])                              # u < p/q
    n = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)                   # [B]
    rows = jnp.arange(B)
    p_n = p[rows, n]                                                                 # [B, V]
    q_n = jnp.concatenate([q, jnp.zeros_like(q[:, :1])], axis=1)[rows, n]            # [B, V]
    residual = jnp.maximum(p_n - q_n, 0.0)
    # p == q leaves no residual, but then a rejection has probability zero: p_n is as good.
    use_residual = (n < m) & (jnp.sum(residual, axis=-1) > 0)
    dist = jnp.where(use_residual[:, None], residual, p_n)                           # [B, V]
    return n, jax.random.categorical(k_token, jnp.log(dist), axis=-1).astype(jnp.int32)


def _greedy_accept(target: jax.Array, drafts: jax.Array, m: jax.Array) -> jax.Array:
    """target argmax [B, k+1], drafts [B, k], m [B] -> the longest matching prefix n [B]."""
    k = drafts.shape[1]
    ok = (drafts == target[:, :k]) & (jnp.arange(k) < m[:, None])
    return jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)


def _probs(lg: jax.Array, s: Sampling) -> jax.Array:
    """logits [B, T, V] -> the tempered, filtered distributions `sample` draws from [B, T, V]."""
    B, T, V = lg.shape
    rep = jax.tree.map(lambda a: jnp.repeat(a, T), s)
    return jax.nn.softmax(_filtered_logits(lg.reshape(B * T, V), rep), axis=-1).reshape(B, T, V)


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "rule"), donate_argnames=("cache",),
                   compiler_options=XLA_OPTIONS)
def verify(params: Params, last: jax.Array, drafts: jax.Array, m: jax.Array, q: jax.Array | None,
           active: jax.Array, cache: KVCache, sampling: Sampling, key: jax.Array, cfg: LlamaConfig,
           plan: Plan = Plan(), rule: Rule = rejection,
           ) -> tuple[jax.Array, jax.Array, jax.Array, KVCache, jax.Array]:
    """Check drafts [B, k] after last [B] in one target step -> out [B, k+1], n [B], the next
    pending token [B], the cache and the key.

    out[b, :n[b] + 1] are row b's new tokens. q [B, k, V] is None for deterministic drafts
    (one-hot). Rows where active [B] is False keep their cache length.
    """
    B, k = drafts.shape
    start = cache.lengths
    tokens = jnp.concatenate([last[:, None], drafts], axis=1)                        # [B, k+1]
    h, cache = transformer(params, tokens, cache, cfg, plan)                         # [B, k+1, D]
    lg = logits(params, h, plan)                                                     # [B, k+1, V]
    greedy = jnp.argmax(lg, axis=-1).astype(jnp.int32)                               # [B, k+1]
    n_greedy = _greedy_accept(greedy, drafts, m)
    key, sub = jax.random.split(key)
    n, nxt = n_greedy, greedy[jnp.arange(B), n_greedy]                               # [B]
    if not sampling.greedy:  # static (no conditional: see Sampling)
        p = _probs(lg, sampling)
        qd = jax.nn.one_hot(drafts, lg.shape[-1], dtype=p.dtype) if q is None else q
        n_s, t_s = rule(p, qd, drafts, m, sub)
        sampled = sampling.temperature > 0
        n, nxt = jnp.where(sampled, n_s, n), jnp.where(sampled, t_s, nxt)
    out = jnp.concatenate([drafts, drafts[:, :1]], axis=1).at[jnp.arange(B), n].set(nxt)
    lengths = jnp.where(active, start + n + 1, start)
    return out, n, nxt, dataclasses.replace(cache, lengths=lengths), key


# --- Proposers -------------------------------------------------------------------------------------

class Proposer(Protocol):
    """Drafts up to k tokens per row. `state` is the proposer's own (device or host) state."""

    reads_contexts: bool  # propose() reads `contexts`: no round may be dispatched before the last is read

    def check(self, target: Model) -> None:
        """Raise ValueError if this proposer cannot draft for `target`."""

    def start(self, target: Model, tokens: jax.Array, n_tokens: jax.Array, max_len: int,
              first: jax.Array) -> object:
        """The state after the prompts tokens [B, T] (n_tokens [B] real) and first tokens [B]."""

    def propose(self, state, contexts: list[list[int] | None], sampling: Sampling, key: jax.Array,
                k: int) -> tuple[jax.Array, jax.Array | None, np.ndarray, object, jax.Array]:
        """-> drafts [B, k], q [B, k, V] or None, m [B] (host) drafts to check, state, key.

        contexts[b]: row b's prompt and tokens so far, or None for a finished row."""

    def commit(self, state, out: jax.Array, n: jax.Array, active: jax.Array) -> object:
        """Keep the state of the accepted prefix: out [B, k+1], n [B] accepted drafts."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DraftState:
    """A draft model's cache and the tokens not yet in it: head [B, 2], the first n_head [B] (1 or
    2) of each row. Two when every draft was accepted: d_k was never fed to the draft."""
    cache: KVCache
    head: jax.Array
    n_head: jax.Array


@functools.partial(jax.jit, static_argnames=("cfg", "plan", "k"), donate_argnames=("cache",))
def draft_tokens(params: Params, head: jax.Array, n_head: jax.Array, cache: KVCache,
                 sampling: Sampling, key: jax.Array, cfg: LlamaConfig, plan: Plan = Plan(),
                 k: int = 4) -> tuple[jax.Array, jax.Array, KVCache, jax.Array]:
    """Feed head [B, 2] (n_head [B] real), then draft k tokens -> drafts [B, k], q [B, k, V]
    (zeros when sampling.greedy), the cache (k - 1 drafts written) and the key."""
    B = head.shape[0]

    def draw(x, key):  # x [B, D] -> token [B], q [B, V]: sample's choice and its distribution
        lg = logits(params, x, plan)                                                 # [B, V]
        key, sub = jax.random.split(key)
        greedy = jnp.argmax(lg, axis=-1).astype(jnp.int32)
        if sampling.greedy:  # static (no conditional: see Sampling)
            return greedy, jnp.zeros_like(lg), key
        fl = _filtered_logits(lg, sampling)
        drawn = jax.random.categorical(sub, fl, axis=-1).astype(jnp.int32)
        return jnp.where(sampling.temperature > 0, drawn, greedy), jax.nn.softmax(fl, axis=-1), key

    h, cache = transformer(params, head, cache, cfg, plan, n_tokens=n_head)           # [B, 2, D]
    tok, q0, key = draw(h[jnp.arange(B), n_head - 1], key)
    drafts = jnp.zeros((B, k), jnp.int32).at[:, 0].set(tok)
    qs = jnp.zeros((B, k) + q0.shape[1:], q0.dtype).at[:, 0].set(q0)

    def step(i, carry):
        tok, cache, key, drafts, qs = carry
        h, cache = transformer(params, tok[:, None], cache, cfg, plan)                # [B, 1, D]
        tok, q, key = draw(h[:, 0], key)
        return tok, cache, key, drafts.at[:, i].set(tok), qs.at[:, i].set(q)

    _, cache, key, drafts, qs = jax.lax.fori_loop(1, k, step, (tok, cache, key, drafts, qs))
    return drafts, qs, cache, key


@functools.partial(jax.jit, static_argnames=("k",))
def _draft_commit(state: DraftState, out: jax.Array, n: jax.Array, active: jax.Array, k: int,
                  ) -> DraftState:
    """Roll the draft cache back to the accepted prefix (see `DraftModel.commit`)."""
    B = n.shape[0]
    # propose fed n_head + k - 1 tokens to a cache n_head - 1 behind the target: now target + k.
    target_len = state.cache.lengths - k                     # the target's length before the round
    rows = jnp.arange(B)
    # The draft cache holds last, d1..d_{k-1}: keep last, d1..dn; if n == k, d_k is still to feed.
    length = jnp.minimum(target_len + 1 + n, target_len + k)
    all_in = n == k
    head = jnp.stack([jnp.where(all_in, out[rows, jnp.maximum(n - 1, 0)], out[rows, n]),
                      jnp.where(all_in, out[rows, n], 0)], axis=1)                  # [B, 2]
    return DraftState(
        cache=dataclasses.replace(state.cache, lengths=jnp.where(active, length, target_len - state.n_head + 1)),
        head=jnp.where(active[:, None], head, state.head),
        n_head=jnp.where(active, jnp.where(all_in, 2, 1), state.n_head))


@dataclasses.dataclass
class DraftModel:
    """A jllm model with the target's vocabulary and tokenizer drafts with its own static cache."""
    model: Model
    reads_contexts = False  # drafts on the device: the next round is dispatched before this one is read

    def __post_init__(self):
        if not isinstance(self.model, Model):
            raise TypeError(f"DraftModel(model={self.model!r:.80}): a {type(self.model).__name__}, not a "
                            f"jllm Model; load the draft first, e.g. DraftModel(jllm.load(path))")

    def check(self, target: Model) -> None:
        d = self.model
        if d.cfg.vocab_size != target.cfg.vocab_size:
            raise ValueError(f"the draft's vocab_size={d.cfg.vocab_size} differs from the target's "
                             f"vocab_size={target.cfg.vocab_size}")
        if d.mesh is not None or target.mesh is not None:
            raise ValueError("speculative decoding runs on one device; a model has a mesh")
        if (d.tokenizer is None) != (target.tokenizer is None):
            raise ValueError("only one of the draft and the target has a tokenizer, so their "
                             "vocabularies cannot be checked")
        if d.tokenizer is not None and d.tokenizer is not target.tokenizer:
            a, b = d.tokenizer, target.tokenizer
            if a.vocab_size != b.vocab_size:
                raise ValueError(f"the draft's tokenizer has {a.vocab_size} pieces, the target's "
                                 f"{b.vocab_size}")
            bad = next((i for i in range(a.vocab_size) if a.piece(i) != b.piece(i)), None)
            if bad is not None:
                raise ValueError(f"the draft's tokenizer differs from the target's: piece {bad} is "
                                 f"{a.piece(bad)!r} vs {b.piece(bad)!r}")

    def start(self, target: Model, tokens: jax.Array, n_tokens: jax.Array, max_len: int,
              first: jax.Array) -> DraftState:
        d, B = self.model, tokens.shape[0]
        cache = init_cache(d.cfg, B, max_len, d.cache_dtype)
        _, cache, _ = prefill(d.params, tokens, n_tokens, cache, Sampling.make(B), jax.random.key(0),
                              cfg=d.cfg, plan=d.plan)
        head = jnp.stack([first, jnp.zeros_like(first)], axis=1)
        return DraftState(cache=cache, head=head, n_head=jnp.ones((B,), jnp.int32))

    def propose(self, state: DraftState, contexts, sampling: Sampling, key: jax.Array, k: int):
        d = self.model
        drafts, q, cache, key = draft_tokens(d.params, state.head, state.n_head, state.cache, sampling,
                                             key, cfg=d.cfg, plan=d.plan, k=k)
        m = np.full((drafts.shape[0],), k, np.int32)
        return drafts, q, m, dataclasses.replace(state, cache=cache), key

    def commit(self, state: DraftState, out: jax.Array, n: jax.Array, active: jax.Array) -> DraftState:
        """The draft cache (last, d1..d_{k-1} written) keeps last, d1..dn: its length is reset;
        the next head is the target's token, after d_k when all k were accepted."""
        return _draft_commit(state, out, n, active, k=out.shape[1] - 1)


def self_draft(target: Model, quantize: str = "int8", group_size: int | None = None) -> DraftModel:
    """The target's own weights quantized in memory (int8 or int4) as its draft."""
    quant.check_mode(quantize, group_size)
    if quantize is None:
        raise ValueError("quantize=None; a self-draft needs 'int8' or 'int4'")
    if target.quant is not None:
        raise ValueError(f"the target is already quantized ({target.quant}); load it in float to "
                         f"draft with a quantized copy, or pass a separate draft model")
    flat, _ = quant.quantize_flat(dict(to_flat(target.params)), quantize, group_size)
    return DraftModel(dataclasses.replace(target, params=from_flat(flat, target.cfg), quant=quantize))


def lookup(seq: Sequence[int], max_ngram: int, k: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest n-gram (n from
    max_ngram down to 1) ending seq; [] when none recurs."""
    a = np.asarray(seq, np.int64)
    for n in range(min(max_ngram, len(a) - 1), 0, -1):
        windows = np.lib.stride_tricks.sliding_window_view(a[:-1], n)              # starts < len - n
        hits = np.nonzero(np.all(windows == a[-n:], axis=1))[0]
        if hits.size:
            i = int(hits[-1]) + n
            return a[i:i + k].tolist()
    return []


@dataclasses.dataclass(frozen=True)
class PromptLookup:
    """Drafts the tokens that followed the last n-gram earlier in the prompt or output (host-side;
    the drafts are deterministic, so q is one-hot)."""
    max_ngram: int = 3

    def __post_init__(self):
        if not isinstance(self.max_ngram, int) or isinstance(self.max_ngram, bool) or self.max_ngram < 1:
            raise ValueError(f"max_ngram={self.max_ngram!r} must be an int >= 1")

    def check(self, target: Model) -> None:
        if target.mesh is not None:
            raise ValueError("speculative decoding runs on one device; the model has a mesh")

    reads_contexts = True  # drafts from the tokens on the host: each round waits for the last one

    def start(self, target, tokens, n_tokens, max_len, first) -> None:
        return None

    def propose(self, state, contexts, sampling, key, k):
        drafts = np.zeros((len(contexts), k), np.int32)
        m = np.zeros((len(contexts),), np.int32)
        for b, seq in enumerate(contexts):
            if seq is not None:
                found = lookup(seq, self.max_ngram, k)
                drafts[b, :len(found)], m[b] = found, len(found)
        return jnp.asarray(drafts), None, m, state, key

    def commit(self, state, out, n, active) -> None:
        return state


@dataclasses.dataclass(frozen=True)
class Speculative:
    """What `generate(..., speculative=...)` takes: a proposer and the tokens k it drafts per step."""
    proposer: DraftModel | PromptLookup
    k: int = 4

    def __post_init__(self):
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 1:
            raise ValueError(f"k={self.k!r} must be an int >= 1")
        if not isinstance(self.proposer, (DraftModel, PromptLookup)):
            raise TypeError(f"proposer must be a DraftModel or PromptLookup; got {type(self.proposer).__name__}")


# --- The decoding loop -----------------------------------------------------------------------------

@dataclasses.dataclass
class Decoding:
    """Device state between rounds: the target cache, the proposer's state, the pending token."""
    cache: KVCache
    proposal: object
    last: jax.Array   # [B] the newest token, not yet in the target cache
    key: jax.Array


def start(model: Model, spec: Speculative, tokens: np.ndarray, n_tokens: np.ndarray, max_len: int,
          sampling: Sampling, seed: int = 0) -> tuple[np.ndarray, Decoding]:
    """Prefill the target and the proposer with prompts tokens [B, T] (n_tokens [B] real) ->
    the first tokens [B] and the state."""
    B = tokens.shape[0]
    tokens_d, n_tokens_d = jnp.asarray(tokens), jnp.asarray(n_tokens)
    cache = init_cache(model.cfg, B, max_len, model.cache_dtype)
    first, cache, key = prefill(model.params, tokens_d, n_tokens_d, cache, sampling, jax.random.key(seed),
                                cfg=model.cfg, plan=model.plan)
    state = spec.proposer.start(model, tokens_d, n_tokens_d, max_len, first)
    return np.asarray(first), Decoding(cache, state, first, key)


def launch(model: Model, spec: Speculative, dec: Decoding, contexts: list[list[int] | None],
           active: np.ndarray, sampling: Sampling, rule: Rule = rejection,
           ) -> tuple[jax.Array, jax.Array, np.ndarray, Decoding]:
    """Dispatch one round for the rows where active [B], reading nothing back -> out [B, k+1] and
    accepted n [B] (device arrays), drafted m [B] (host) and the new state."""
    p = spec.proposer
    drafts, q, m, state, key = p.propose(dec.proposal, contexts, sampling, dec.key, spec.k)
    active_d = jnp.asarray(active)
    out, n, last, cache, key = verify(model.params, dec.last, drafts, jnp.asarray(m), q, active_d,
                                      dec.cache, sampling, key, cfg=model.cfg, plan=model.plan, rule=rule)
    state = p.commit(state, out, n, active_d)
    return out, n, m, Decoding(cache, state, last, key)


def step(model: Model, spec: Speculative, dec: Decoding, contexts: list[list[int] | None],
         active: np.ndarray, sampling: Sampling, rule: Rule = rejection,
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray, Decoding]:
    """One round for the rows where active [B] -> out [B, k+1], accepted n [B] and drafted m [B]
    (host arrays) and the new state; row b's new tokens are out[b, :n[b] + 1]."""
    out, n, m, dec = launch(model, spec, dec, contexts, active, sampling, rule)
    return np.asarray(out), np.asarray(n), m, dec


def generate(model: Model, prompts, spec: Speculative, *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, seed: int = 0, stop: str | Sequence[str] | None = None,
             stop_token_ids: Sequence[int] | None = None,
             stream: Callable[[Delta], None] | None = None, rule: Rule = rejection) -> list[Completion]:
    """`jllm.generate` with speculation: the same arguments and results, plus speculation stats.

    rule: the acceptance rule for sampled rows (default the exact `rejection`).
    """
    t_call = time.perf_counter()
    if not isinstance(spec, Speculative):
        raise TypeError(f"speculative must be a jllm.speculative.Speculative; got {type(spec).__name__}")
    _check_k(spec.k, model)
    if isinstance(stop, str):
        stop = [stop]
    ids = _check_args(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                      top_p=top_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids, stream=stream, min_p=min_p)
    max_new_tokens, seed, temperature = int(max_new_tokens), int(seed), float(temperature)
    top_k = None if top_k is None else int(top_k)
    top_p = None if top_p is None else float(top_p)
    min_p = None if min_p is None else float(min_p)
    spec.proposer.check(model)
    stop = list(stop or [])
    if stop_token_ids is None:
        stop_token_ids = list(model.tokenizer.stop_ids) if model.tokenizer is not None else []
    n, k = len(ids), spec.k
    B = bucket(n, minimum=1)
    T = bucket(max(map(len, ids)), buckets=model.prompt_buckets)
    # Room for the k+1 positions a round writes at a row's length, twice for a draft model: a row
    # that finished may run one more round, dispatched before its end was read (`_run`). After that
    # a finished row's length is frozen; its slots of later rounds may lie past S near max_seq_len,
    # and such writes are dropped (nothing reads them).
    slack = (k + 1) * (1 if spec.proposer.reads_contexts else 2)
    S = min(bucket(T + max_new_tokens + slack), model.cfg.max_seq_len + slack)
    T = min(T, S)
    tokens = np.zeros((B, T), np.int32)
    n_tokens = np.ones((B,), np.int32)  # padding rows hold one token and are never active
    for i, p in enumerate(ids):
        tokens[i, :len(p)], n_tokens[i] = p, len(p)
    sampling = Sampling.make(B, temperature, top_k, top_p, min_p)
    rows = [Row(i, p, model.tokenizer, stop, set(stop_token_ids), max_new_tokens) for i, p in enumerate(ids)]
    with costs.CompileClock() as clock:
        return _run(model, spec, rows, tokens, n_tokens, S, sampling, seed, stream, t_call, rule, clock)


def _run(model: Model, spec: Speculative, rows: list[Row], tokens: np.ndarray, n_tokens: np.ndarray,
         S: int, sampling: Sampling, seed: int, stream, t_call: float, rule: Rule,
         clock: costs.CompileClock) -> list[Completion]:
    B = tokens.shape[0]
    steps, drafted, accepted, produced = (np.zeros(B, np.int64) for _ in range(4))

    def push(row: Row, new: list[int]) -> None:
        delta = row.push(new, time.perf_counter())
        if delta is not None and stream is not None:
            stream(delta)

    first, dec = start(model, spec, tokens, n_tokens, S, sampling, seed)
    for row in rows:
        push(row, [int(first[row.index])])
    t_first = time.perf_counter()

    def running() -> np.ndarray:
        return np.array([i < len(rows) and rows[i].finish is None for i in range(B)])

    # A device-side proposer's next round is dispatched before the last one is read back, so the
    # GPU never waits for the host; a row that finished in the round being read runs one more
    # round whose tokens are dropped (the cache has room for it: S above).
    ahead = not spec.proposer.reads_contexts
    active, inflight = running(), None
    while active.any() or inflight is not None:
        launched = None
        if active.any() and (ahead or inflight is None):
            contexts = [rows[i].prompt + rows[i].tokens if active[i] and not ahead else None for i in range(B)]
            out, n, m, dec = launch(model, spec, dec, contexts, active, sampling, rule)
            launched = out, n, m, active
        if inflight is not None:
            out, n, m, was_active = inflight
            out, n = np.asarray(out), np.asarray(n)
            for i in np.nonzero(was_active)[0]:
                if rows[i].finish is not None:  # ended in an earlier round: this one's tokens are dropped
                    continue
                row, new = rows[i], out[i, :n[i] + 1].tolist()
                before = len(row.tokens)
                push(row, new)
                kept = len(row.tokens) - before  # a stop or max_new_tokens inside the run drops the rest
                if kept < len(new) and row.finish == "stop" and new[kept] in row.stop_ids:
                    kept += 1  # the stop id that ends the row: produced, though not part of the text
                steps[i] += 1
                drafted[i] += m[i]
                accepted[i] += n[i]  # verified; drafts past a stop were checked all the same
                produced[i] += kept
            active = running()
        inflight = launched
    results = []
    for row in rows:
        i = row.index
        t_done = row.t_done or t_first
        decode_s = t_done - t_first - clock.seconds(t_first, t_done)  # compile time taken out, as in generate
        rate = (len(row.tokens) - 1) / decode_s if len(row.tokens) > 1 and decode_s > 0 else 0.0
        s = int(steps[i])
        stats = Stats(prompt_tokens=len(row.prompt), generated_tokens=len(row.tokens),
                      ttft_s=t_first - t_call - clock.seconds(t_call, t_first), decode_tokens_per_s=rate,
                      compile_s=clock.seconds(),
                      draft_tokens_per_step=float(drafted[i] / s) if s else 0.0,
                      acceptance=float(accepted[i] / drafted[i]) if drafted[i] else 0.0,
                      tokens_per_step=float(produced[i] / s) if s else 0.0, target_steps=s)
        results.append(Completion(row.tokens, row.text, row.finish, stats))
    return results


# --- What the CLI calls ----------------------------------------------------------------------------

def _check_k(k: int, model: Model) -> None:
    if k >= model.cfg.max_seq_len:
        raise ValueError(f"k={k}: a step checks k + 1 positions, more than the model's context of "
                         f"{model.cfg.max_seq_len} (max_seq_len)")


def from_args(model: Model, speculate: int | None, draft=None, draft_quantize: str | None = None,
              prompt_lookup: int | None = None, group_size: int | None = None) -> Speculative | None:
    """The Speculative for `--speculate K` with one of `--draft DIR` (a checkpoint directory or a
    Model), `--draft-quantize int8|int4` or `--prompt-lookup N`; None without --speculate."""
    given = {name: v for name, v in (("draft", draft), ("draft_quantize", draft_quantize),
                                      ("prompt_lookup", prompt_lookup)) if v is not None}
    if speculate is None:
        if given:
            raise ValueError(f"{', '.join(given)} given without speculate (--speculate K)")
        return None
    if not isinstance(speculate, int) or isinstance(speculate, bool) or speculate < 1:
        raise ValueError(f"speculate={speculate!r} must be an int >= 1 (tokens drafted per step)")
    if len(given) != 1:
        raise ValueError(f"speculate needs exactly one of draft, draft_quantize, prompt_lookup; "
                         f"got {sorted(given) or 'none'}")
    _check_k(speculate, model)
    if draft is not None:
        if not isinstance(draft, Model):
            from jllm import load  # the package imports this module's importers
            draft = load(draft, dtype=jnp.dtype(model.dtype).name, attn_impl=model.attn_impl,
                         matmul_impl=model.matmul_impl, progress=False)
        proposer = DraftModel(draft)
        proposer.check(model)
    elif draft_quantize is not None:
        if draft_quantize not in quant.MODES:
            raise ValueError(f"draft_quantize={draft_quantize!r}; expected one of {sorted(quant.MODES)}")
        proposer = self_draft(model, draft_quantize, group_size)
    else:
        proposer = PromptLookup(prompt_lookup)
    return Speculative(proposer, speculate)


def format_stats(stats: Stats | Sequence[Stats]) -> str:
    """'acceptance 72.5%, 3.10 tokens/step, 4.0 drafted/step' over one or more rows' stats, weighted
    by their target steps; '' when they hold no speculation stats."""
    rows = [stats] if isinstance(stats, Stats) else list(stats)
    rows = [s for s in rows if s.target_steps]
    if not rows:
        return ""
    steps = sum(s.target_steps for s in rows)
    drafted = sum(s.draft_tokens_per_step * s.target_steps for s in rows)
    accepted = sum(s.acceptance * s.draft_tokens_per_step * s.target_steps for s in rows)
    produced = sum(s.tokens_per_step * s.target_steps for s in rows)
    acceptance = accepted / drafted if drafted else 0.0
    return (f"acceptance {100 * acceptance:.1f}%, {produced / steps:.2f} tokens/step, "
            f"{drafted / steps:.1f} drafted/step")
