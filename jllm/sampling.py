"""Token sampling: greedy, temperature, top-k, top-p, min-p, with per-row values as traced
arrays; the penalties and logit bias applied before it."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np


TOP_K_MAX = 2 ** 31 - 1  # the int32 the sampler reads; any top_k past the vocabulary keeps every token
MAX_LOGPROBS = 20        # the most top alternatives per token one may ask for (OpenAI's limit)
MAX_LOGIT_BIAS = 300     # entries of a logit_bias (OpenAI's limit)

Logprob = tuple[int, float, list[tuple[int, float]]]  # (token_id, logprob, [(alt_id, alt_logprob), ...])


def top_k_code(top_k: int | None) -> int:
    """A top_k (None or an int >= 1) as the int32 the sampler reads: 0 for no cut, and values
    past int32 clamped, which keeps their meaning (a cut at or past the vocabulary keeps all)."""
    return 0 if top_k is None else min(int(top_k), TOP_K_MAX)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
    """Per-row sampling values. They are data, not static arguments: changing them never recompiles.

    `greedy` is static: True promises every row has temperature 0, so sampling is an argmax and
    no sort is traced. It replaces a data-dependent conditional, which XLA:GPU runs by copying
    the predicate to the host and waiting for it: a stall in every decode step. Greedy and
    sampled calls are two compiled programs."""
    temperature: jax.Array  # [B] float32; 0 means greedy (argmax)
    top_k: jax.Array        # [B] int32; 0 means no top-k cut
    top_p: jax.Array        # [B] float32; 1 means no nucleus cut
    min_p: jax.Array        # [B] float32; 0 means no min-p cut
    greedy: bool = dataclasses.field(default=False, metadata=dict(static=True))
    # Static too: False promises no row cuts (top_k 0, top_p 1, min_p 0), so the sort over the
    # vocabulary behind the cuts is not traced (temperature alone: OpenAI's default sampling).
    filtered: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @classmethod
    def make(cls, batch: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None) -> "Sampling":
        return cls(temperature=jnp.full((batch,), temperature, jnp.float32),
                   top_k=jnp.full((batch,), top_k_code(top_k), jnp.int32),
                   top_p=jnp.full((batch,), 1.0 if top_p is None else top_p, jnp.float32),
                   min_p=jnp.full((batch,), 0.0 if min_p is None else min_p, jnp.float32),
                   greedy=temperature == 0,
                   filtered=temperature != 0 and (top_k is not None or (top_p is not None and top_p < 1)
                                                   or bool(min_p)))


def _filtered_logits(logits: jax.Array, s: Sampling) -> jax.Array:
    """logits [B, V] float32 -> tempered logits with everything outside top-k / top-p / min-p at -inf."""
    V = logits.shape[-1]
    x = logits / jnp.maximum(s.temperature, 1e-6)[:, None]                    # [B, V]
    if not s.filtered:  # static: no row cuts anything
        return x
    sorted_x = -jnp.sort(-x, axis=-1)                                          # [B, V] descending
    k = jnp.where(s.top_k > 0, jnp.minimum(s.top_k, V), V)                     # [B]
    kth = jnp.take_along_axis(sorted_x, (k - 1)[:, None], axis=-1)             # [B, 1]
    sorted_x = jnp.where(jnp.arange(V) < k[:, None], sorted_x, -jnp.inf)
    # Nucleus: keep the smallest prefix of the sorted tokens whose mass reaches top_p; a token is
    # kept when the mass strictly before it is below top_p, so the first token always survives.
    # top_p >= 1 keeps every token: the float32 running sum reaches 1 before the tail does.
    probs = jax.nn.softmax(sorted_x, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < s.top_p[:, None]) | (s.top_p[:, None] >= 1)
    # >= 1: a top_p that rounds to 0 in float32 keeps (only) the first token too
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)                            # [B]
    pth = jnp.take_along_axis(sorted_x, (n_keep - 1)[:, None], axis=-1)        # [B, 1]
    # Min-p: keep a token whose probability is at least min_p times the most likely one's,
    # p / p_max = exp(x - x_max) >= min_p (as Hugging Face's MinPLogitsWarper; min_p 0: log = -inf).
    mth = sorted_x[:, :1] + jnp.log(s.min_p)[:, None]                          # [B, 1]
    cut = jnp.maximum(jnp.maximum(kth, pth), mth)
    return jnp.where(x >= cut, x, -jnp.inf)


def sample(logits: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
    """logits [B, V] -> tokens [B] int32. Rows with temperature 0 take the argmax."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if s.greedy:  # static: the sort behind top-k/top-p is not traced
        return greedy
    drawn = jax.random.categorical(key, _filtered_logits(logits, s), axis=-1)
    return jnp.where(s.temperature > 0, drawn.astype(jnp.int32), greedy)


def top_logprobs(lg: jax.Array, tokens: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Logits lg [S, V] -> the log-probability of tokens [S] and the MAX_LOGPROBS most likely
    tokens' ids and log-probabilities [S, MAX_LOGPROBS], in float32."""
    lp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)                        # [S, V]
    chosen = jnp.take_along_axis(lp, tokens[:, None], axis=-1)[:, 0]
    top, ids = jax.lax.top_k(lp, MAX_LOGPROBS)
    return chosen, ids.astype(jnp.int32), top


def logprob_entries(tokens, chosen, top_ids, top_lp, n: int) -> list[Logprob]:
    """Host rows of `top_logprobs`' outputs (tokens and chosen [K], top_ids and top_lp
    [K, MAX_LOGPROBS]) -> K entries, each with its n most likely alternatives."""
    return [(int(t), float(c), [(int(a), float(b)) for a, b in zip(i[:n], v[:n])])
            for t, c, i, v in zip(tokens, chosen, top_ids, top_lp)]


def penalize(logits: jax.Array, counts: jax.Array, presence: jax.Array, frequency: jax.Array,
             repetition: jax.Array, prompt_seen: jax.Array, bias: jax.Array) -> jax.Array:
    """The logit bias and the penalties, applied before temperature, top-k and top-p, and before
    the argmax of greedy rows, in vLLM's order: first OpenAI's logit_bias (bias [B, V] added),
    then the repetition penalty (CTRL's, as Hugging Face applies it: a token in the prompt
    (prompt_seen [B, V]) or generated already has its logit divided by repetition [B] when
    positive, multiplied when negative), then OpenAI's presence and frequency penalties (less
    presence [B] for every token the row has generated and frequency [B] per time it has:
    counts [B, V] of its generated tokens)."""
    c = counts.astype(jnp.float32)
    x = logits.astype(jnp.float32) + bias
    r = repetition[:, None]
    x = jnp.where(prompt_seen | (c > 0), jnp.where(x > 0, x / r, x * r), x)
    return x - presence[:, None] * (c > 0) - frequency[:, None] * c


def unpack_allowed(words: jax.Array, vocab_size: int) -> jax.Array:
    """Packed token masks [R, ceil(V / 32)] uint32 (bit j of word w: token 32 w + j, llguidance's
    layout) -> [R, V] bool. A guided row's mask crosses to the device in V / 8 bytes, not 4 V."""
    idx = jnp.arange(vocab_size)
    return ((words[:, idx >> 5] >> (idx & 31).astype(jnp.uint32)) & 1).astype(bool)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Penalties:
    """Presence, frequency and repetition penalties per row [B], the tokens of each row's prompt
    (prompt_seen [B, V]) and the counts [B, V] of its generated tokens so far
    (`sampling.penalize`); `decode` returns them updated."""
    presence: jax.Array
    frequency: jax.Array
    repetition: jax.Array
    prompt_seen: jax.Array
    counts: jax.Array
    bias: jax.Array   # [B, V] float32: the logit bias
    # Guided decoding: [B, ceil(V / 32)] uint32 packed masks of the tokens each row's grammar
    # allows (unpack_allowed); the others get -inf. None: no grammar (a static choice).
    allowed: jax.Array | None = None

    @classmethod
    def make(cls, prompts: list[list[int]], B: int, V: int, presence: float, frequency: float,
             repetition: float, logit_bias: dict[int, float]) -> "Penalties":
        """Host arrays for a batch of B rows (the first len(prompts) real)."""
        seen = np.zeros((B, V), bool)
        for i, p in enumerate(prompts):
            seen[i, p] = True
        bias = np.zeros((B, V), np.float32)
        bias[:, list(logit_bias)] = list(logit_bias.values())
        full = lambda x: np.full((B,), x, np.float32)  # noqa: E731
        return cls(full(presence), full(frequency), full(repetition), seen, np.zeros((B, V), np.int32), bias)

    def add(self, token: jax.Array) -> "Penalties":
        """Count one more generated token [B] per row."""
        rows = jnp.arange(token.shape[0])
        return dataclasses.replace(self, counts=self.counts.at[rows, token].add(1))

    def apply(self, logits: jax.Array) -> jax.Array:
        x = penalize(logits, self.counts, self.presence, self.frequency, self.repetition, self.prompt_seen,
                     self.bias)
        return x if self.allowed is None else jnp.where(unpack_allowed(self.allowed, x.shape[-1]), x, -jnp.inf)
