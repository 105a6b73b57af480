"""The engine's request and result types: SamplingParams, RequestOutput, RequestMetrics, EngineStats."""
import dataclasses
import math

import numpy as np

from jllm.guided import Guided
from jllm.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS, Logprob  # noqa: F401 (Logprob: part of this API)

# A seed is 32 bits (jax.random.key's without jax_enable_x64): s and s - 2**32 are one seed, and
# a seed s in [0, 2**32) gives the tokens `jllm.generate(..., seed=s)` gives.
SEED_RANGE = (-2 ** 31, 2 ** 32)


def seed_int32(seed: int) -> int:
    """The seed in SEED_RANGE as the int32 with its bits (the engine's per-slot seed array)."""
    return (int(seed) + 2 ** 31) % 2 ** 32 - 2 ** 31


class QueueFull(RuntimeError):
    """The waiting queue holds max_queue requests already."""


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How one request samples and when it stops (checked when made: ValueError/TypeError naming the field).

    temperature 0 is greedy; min_p keeps tokens at least min_p times as likely as the most likely
    one (after temperature), with top-k and top-p. stop_token_ids None stops on the tokenizer's EOS; () never stops on
    a token. logprobs N: the chosen token's log-probability and the N most likely alternatives,
    under the model's distribution before penalties, temperature, top-k and top-p.
    presence_penalty / frequency_penalty in [-2, 2]: as `jllm.generate`'s (OpenAI's), over the
    tokens the request has generated; repetition_penalty in [0.01, 100] (Hugging Face's), over its prompt
    and generated tokens; logit_bias {token id: bias in [-100, 100]} (OpenAI's, at most 300
    entries), kept as sorted (id, bias) pairs. prompt_logprobs N (an Engine made with
    prompt_logprobs=True): each prompt token's log-probability given the tokens before it and the
    N most likely alternatives there, in the request's first output (None for the first token).
    guided (a `jllm.guided.Guided`: a JSON schema, any JSON object, a regex or a Lark grammar):
    every sampled token keeps the output a valid prefix of it, and the request stops ("stop")
    once the output is complete; the engine then waits for each step's tokens before the next.
    """
    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    seed: int = 0
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    prompt_logprobs: int | None = None
    guided: Guided | None = None

    @property
    def penalized(self) -> bool:
        """Any penalty or bias (a grammar's mask is one): the request samples through `sampling.penalize`."""
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1
                    or self.logit_bias or self.guided is not None)

    def __post_init__(self):
        def bad(name, expected, exc=ValueError):
            raise exc(f"SamplingParams.{name}={getattr(self, name)!r}; expected {expected}")

        if not _is_int(self.max_tokens):
            bad("max_tokens", "an int >= 1", TypeError)
        if self.max_tokens < 1:
            bad("max_tokens", "an int >= 1")
        if not _is_number(self.temperature):
            bad("temperature", "a number >= 0", TypeError)
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            bad("temperature", "a finite number >= 0")
        if self.top_k is not None:
            if not _is_int(self.top_k):
                bad("top_k", "None or an int >= 1", TypeError)
            if self.top_k < 1:
                bad("top_k", "None or an int >= 1")
        if self.top_p is not None:
            if not _is_number(self.top_p):
                bad("top_p", "None or a number in (0, 1]", TypeError)
            if not 0 < self.top_p <= 1:
                bad("top_p", "None or a number in (0, 1]")
        if self.min_p is not None:
            if not _is_number(self.min_p):
                bad("min_p", "None or a number in [0, 1]", TypeError)
            if not 0 <= self.min_p <= 1:
                bad("min_p", "None or a number in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not _is_number(getattr(self, name)):
                bad(name, "a number in [-2, 2]", TypeError)
            if not -2 <= getattr(self, name) <= 2:
                bad(name, "a number in [-2, 2]")
        if not _is_number(self.repetition_penalty):
            bad("repetition_penalty", "a number in [0.01, 100] (1 is no penalty)", TypeError)
        if not 0.01 <= self.repetition_penalty <= 100:
            bad("repetition_penalty", "a number in [0.01, 100] (1 is no penalty)")
        bias = self.logit_bias.items() if isinstance(self.logit_bias, dict) else self.logit_bias
        try:
            bias = sorted((t, b) for t, b in bias)
        except (TypeError, ValueError):
            bad("logit_bias", "a dict of token id -> bias (or (id, bias) pairs)", TypeError)
        if len(bias) > MAX_LOGIT_BIAS or len({t for t, _ in bias}) < len(bias):
            bad("logit_bias", f"at most {MAX_LOGIT_BIAS} distinct token ids")
        for t, b in bias:
            if not _is_int(t) or t < 0:
                bad("logit_bias", f"token ids >= 0; got {t!r}")
            if not _is_number(b) or not -100 <= b <= 100:
                bad("logit_bias", f"biases in [-100, 100]; got {b!r} for token {t}")
        object.__setattr__(self, "logit_bias", tuple((int(t), float(b)) for t, b in bias))
        if not _is_int(self.seed):
            bad("seed", f"an int in [{SEED_RANGE[0]}, {SEED_RANGE[1]})", TypeError)
        if not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]:
            bad("seed", f"an int in [{SEED_RANGE[0]}, {SEED_RANGE[1]})")
        stop = (self.stop,) if isinstance(self.stop, str) else self.stop
        if not isinstance(stop, (tuple, list)) or not all(isinstance(s, str) for s in stop):
            bad("stop", "a tuple of non-empty strings", TypeError)
        if not all(stop):
            bad("stop", "a tuple of non-empty strings")
        object.__setattr__(self, "stop", tuple(stop))
        if self.stop_token_ids is not None:
            ids = self.stop_token_ids
            if not isinstance(ids, (tuple, list)) or not all(_is_int(t) for t in ids):
                bad("stop_token_ids", "None or a tuple of ints", TypeError)
            if any(t < 0 for t in ids):
                bad("stop_token_ids", "None or a tuple of ints >= 0")
            object.__setattr__(self, "stop_token_ids", tuple(int(t) for t in ids))
        for name in ("logprobs", "prompt_logprobs"):
            if getattr(self, name) is not None:
                if not _is_int(getattr(self, name)):
                    bad(name, f"None or an int in [0, {MAX_LOGPROBS}]", TypeError)
                if not 0 <= getattr(self, name) <= MAX_LOGPROBS:
                    bad(name, f"None or an int in [0, {MAX_LOGPROBS}]")
        if self.guided is not None and not isinstance(self.guided, Guided):
            bad("guided", "None or a jllm.guided.Guided (Guided.json_schema(...), .json_object(), .regex(...), "
                          ".lark(...))", TypeError)


@dataclasses.dataclass
class RequestMetrics:
    """Timings of one finished request, in seconds from its add_request."""
    queue_s: float                # until its first step was scheduled
    ttft_s: float                 # until its first token reached the host
    decode_tokens_per_s: float    # tokens after the first, per second (0 with fewer than two)
    cached_prompt_tokens: int     # prompt tokens served from the prefix cache (first admission)
    preemptions: int = 0          # times it was preempted and recomputed




@dataclasses.dataclass
class RequestOutput:
    """What one step produced for one request: new text and ids since its last output."""
    request_id: str
    text: str                   # never a split UTF-8 character or a possible stop-string prefix
    token_ids: list[int]
    finished: bool
    finish_reason: str | None   # "stop" | "length" | "abort" | None while running
    prompt_tokens: int
    completion_tokens: int      # total so far
    logprobs: list[Logprob] | None = None
    metrics: RequestMetrics | None = None  # on the final output
    prompt_logprobs: list[Logprob | None] | None = None  # on the first output, when asked for


@dataclasses.dataclass
class EngineStats:
    """Counters since the engine started, and the pool's state now."""
    running: int
    waiting: int
    pages_used: int             # pages referenced by requests
    pages_total: int
    pages_cached: int           # unreferenced pages kept by the prefix cache
    prefix_hit_tokens: int      # prompt tokens served from the prefix cache
    prompt_tokens: int          # prompt tokens of admitted requests (each counted once)
    prefill_tokens: int         # tokens computed in prompt chunks (recomputation included)
    generated_tokens: int
    aborted: int
    preemptions: int
    steps: int
    drafted_tokens: int = 0              # prompt-lookup drafts verified (speculative engines)
    accepted_tokens: int = 0             # of them, accepted
    kv_cache_usage: float = 0.0          # pages_used / pages_total
    prefix_cache_hit_ratio: float = 0.0  # prefix_hit_tokens / prompt_tokens

    def __post_init__(self):
        self.kv_cache_usage = self.pages_used / self.pages_total if self.pages_total else 0.0
        self.prefix_cache_hit_ratio = self.prefix_hit_tokens / self.prompt_tokens if self.prompt_tokens else 0.0
