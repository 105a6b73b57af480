"""The engine with prompt-lookup speculation against `jllm.generate` on each prompt alone:
greedy tokens equal (drafts accepted), stop ids and max_tokens exact, seeded sampled rows equal
(alone, batched, preempted) and distributed as plain sampling (a chi-square test), page
accounting, no compilation after start-up, bad options refused.

Shapes as in test_engine.py (4 slots, pages of 4 tokens, 24 pages, 16 tokens per step in chunk
rows of 8); prompts repeat a random n-gram so that drafts are found and accepted. The sampling
tests use a 32-token model, whose continuations can be enumerated.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jllm
from conftest import random_flat
from jllm.engine import Engine, SamplingParams, step
from jllm.engine.step import engine_step
from jllm.generate import Model
from jllm.kvcache import init_cache
from jllm.model import forward, from_flat
from jllm.sampling import Sampling, _filtered_logits
from jllm.speculative import DraftModel, PromptLookup, Speculative

KW = dict(max_seqs=4, page_size=4, num_pages=24, max_tokens_per_step=16, chunk_row=8,
          decode_buckets=(2, 4), progress=False)


def _reference(model, prompt, params: SamplingParams) -> list[int]:
    [r] = jllm.generate(model, [prompt], max_new_tokens=params.max_tokens, temperature=params.temperature,
                        top_k=params.top_k, top_p=params.top_p, seed=params.seed,
                        stop_token_ids=list(params.stop_token_ids or []))
    return r.tokens


def _prompts(rng, n: int) -> list[list[int]]:
    """Prompts that repeat a random n-gram, some ending inside it (a lookup hit at once)."""
    out = []
    for i in range(n):
        gram = rng.integers(3, 512, int(rng.integers(2, 6))).tolist()
        out.append((gram * 4)[:len(gram) * 3 + i % len(gram)] + rng.integers(3, 512, i % 3).tolist())
    return out


def _run(engine: Engine, prompts, params) -> dict[int, tuple[list[int], str]]:
    """Requests arriving over the first steps -> {index: (tokens, finish reason)}; checks the
    page pool after every step."""
    ids, got, step = {}, {}, 0
    while step < len(prompts) or engine.has_unfinished():
        if step < len(prompts):
            ids[engine.add_request(prompts[step], params[step])] = step
            got[step] = ([], None)
        for out in engine.step():
            toks, reason = got[ids[out.request_id]]
            assert reason is None, f"output after the final one: {out}"
            got[ids[out.request_id]] = (toks + out.token_ids, out.finish_reason)
        engine.pool.check()
        for req in engine.scheduler.running:
            np.testing.assert_array_equal(engine.scheduler.tables[req.slot, :len(req.pages)], req.pages)
        step += 1
    return got


def _all_free(engine: Engine) -> None:
    engine.pool.check()
    assert engine.pool.used == 0 and not engine.scheduler.running and not engine.scheduler.waiting
    assert (engine.scheduler.tables == -1).all()
    engine.pool.evict_all()
    assert engine.pool.available() == engine.num_pages == len(engine.pool.free)


@pytest.mark.parametrize("k", [1, 3])
def test_greedy_with_prompt_lookup_matches_generate(tiny_model_no_tokenizer, k):
    """Greedy requests (max_tokens and stop ids at random) give generate's tokens exactly, with
    drafts accepted; compilation happens only at start-up; every page comes back."""
    m = tiny_model_no_tokenizer
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    rng = np.random.default_rng(k)
    prompts = _prompts(rng, 10)
    params = []
    for i, p in enumerate(prompts):
        # Every third request stops on a token that greedy decoding reaches mid-way.
        ref = _reference(m, p, SamplingParams(max_tokens=20, stop_token_ids=()))
        stop = (ref[int(rng.integers(1, len(ref)))],) if i % 3 == 1 else ()
        params.append(SamplingParams(max_tokens=int(rng.integers(5, 21)), stop_token_ids=stop))
    refs = [_reference(m, p, sp) for p, sp in zip(prompts, params)]
    assert any(len(r) < sp.max_tokens for r, sp in zip(refs, params)), "no request was meant to stop early"
    engine = Engine(m, **KW, speculative=Speculative(PromptLookup(3), k))
    assert not engine.async_scheduling
    before, n_before = engine_step._cache_size(), len(compiles)
    got = _run(engine, prompts, params)
    for i, (ref, sp) in enumerate(zip(refs, params)):
        assert got[i] == (ref, "stop" if len(ref) < sp.max_tokens else "length"), i
    stats = engine.stats()
    assert stats.drafted_tokens > 0 and 0 < stats.accepted_tokens <= stats.drafted_tokens
    assert (engine_step._cache_size(), len(compiles)) == (before, n_before)
    _all_free(engine)


def test_sampled_rows_speculate_with_generates_tokens_and_logprob_rows_do_not(tiny_model_no_tokenizer):
    """Seeded sampled requests speculate under a speculative engine and still give generate's
    tokens (a verified row samples each position with the key plain decoding would use); greedy
    ones asking for logprobs decode plainly: nothing is drafted for them."""
    m = tiny_model_no_tokenizer
    engine = Engine(m, **KW, speculative=Speculative(PromptLookup(2), 3))
    prompts = _prompts(np.random.default_rng(7), 4)
    params = [SamplingParams(max_tokens=12, temperature=t, top_k=5, seed=11 + i, stop_token_ids=())
              for i, t in enumerate((0.8, 1.0, 1.3))] + [SamplingParams(max_tokens=12, logprobs=2, stop_token_ids=())]
    got = _run(engine, prompts[:3], params[:3])
    for i, (p, sp) in enumerate(zip(prompts[:3], params[:3])):
        assert got[i] == (_reference(m, p, sp), "length"), i
    assert engine.stats().drafted_tokens > 0
    _all_free(engine)
    engine = Engine(m, **KW, speculative=Speculative(PromptLookup(2), 3))
    assert _run(engine, prompts[3:], params[3:])[0] == (_reference(m, prompts[3], params[3]), "length")
    assert engine.stats().drafted_tokens == 0
    _all_free(engine)


def test_bad_speculative_options_are_refused(tiny_model_no_tokenizer):
    m = tiny_model_no_tokenizer
    with pytest.raises(TypeError, match="speculative"):
        Engine(m, **KW, speculative=PromptLookup(3))
    with pytest.raises(ValueError, match="PromptLookup"):
        Engine(m, **KW, speculative=Speculative(DraftModel(m), 2))
    with pytest.raises(ValueError, match="chunk_row=8"):
        Engine(m, **KW, speculative=Speculative(PromptLookup(3), 8))


def test_stop_strings_cut_accepted_tokens_as_generate_does(tiny_model):
    """A stop string inside a step's accepted tokens ends the text and tokens where generate does."""
    prompt = "the cat sat on the mat. the cat sat on the mat. the cat sat"
    [ref] = jllm.generate(tiny_model, prompt, max_new_tokens=30, stop_token_ids=[])
    text = ref.text
    start = next(i for i in range(len(text) - 3, 4, -1) if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip())
    stop = text[start:start + 3]
    [want] = jllm.generate(tiny_model, prompt, max_new_tokens=30, stop=[stop], stop_token_ids=[])
    engine = Engine(tiny_model, **KW, speculative=Speculative(PromptLookup(2), 3))
    [out] = engine.generate([prompt], SamplingParams(max_tokens=30, stop=(stop,), stop_token_ids=()))
    assert (out.text, out.token_ids, out.finish_reason) == (want.text, want.tokens, "stop")
    assert out.text == text[:text.find(stop)]
    assert engine.stats().drafted_tokens > 0
    _all_free(engine)


def test_drafting_requests_leave_a_waiting_prompt_a_chunk_row(scripted_model):
    """Two greedy requests on a 4-token cycle draft at every step; with one chunk row per step
    (max_prompts_per_step=1) a prompt that arrives meanwhile still gets that row at once, instead
    of waiting for the drafting requests to end. Tokens stay generate's."""
    cycle = {c: 3 + (c - 2) % 4 for c in range(512)}  # 3 -> 4 -> 5 -> 6 -> 3 ...
    m = scripted_model(cycle)
    engine = Engine(m, max_seqs=4, page_size=4, num_pages=64, max_tokens_per_step=16, chunk_row=8,
                    decode_buckets=(2, 4), max_prompts_per_step=1, progress=False,
                    speculative=Speculative(PromptLookup(2), 3))
    long = SamplingParams(max_tokens=60, stop_token_ids=())
    ids = [engine.add_request([3, 4, 5, 6, 3, 4], long), engine.add_request([5, 6, 3, 4, 5], long)]
    got = {i: [] for i in ids}
    for _ in range(4):  # both prefilled and decoding
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert all(got.values())
    drafted = engine.scheduler.drafted_tokens
    late = engine.add_request([9, 10, 11], SamplingParams(max_tokens=3, stop_token_ids=()))
    got[late] = []
    steps = 0
    while engine.has_unfinished():
        steps += 1
        for out in engine.step():
            got[out.request_id] += out.token_ids
        if not got[late]:
            assert steps < 4, "the late prompt was held back by draft rows"
    assert engine.scheduler.drafted_tokens > drafted  # the cycle kept drafting
    for rid, prompt, sp in ((ids[0], [3, 4, 5, 6, 3, 4], long), (ids[1], [5, 6, 3, 4, 5], long),
                            (late, [9, 10, 11], SamplingParams(max_tokens=3, stop_token_ids=()))):
        assert got[rid] == _reference(m, prompt, sp)
    _all_free(engine)


def test_a_short_draft_after_rejected_long_one_takes_no_pages(scripted_model):
    """7 drafts rejected at once leave their pages reserved (5 pages for 19 positions); the next
    verification, 3 drafts from position 12, fits in 4 of them: it takes no page (it once took
    minus one, and the pool's count of used pages went wrong)."""
    m = scripted_model({3: 4, 4: 12, 12: 3})   # a -> b -> x -> a ...
    engine = Engine(m, **{**KW, "num_pages": 64}, speculative=Speculative(PromptLookup(2), 7))
    prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 3]   # "a b" drafts c..i (rejected), then "x" drafts a b x
    sp = SamplingParams(max_tokens=12, stop_token_ids=())
    rid, toks = engine.add_request(prompt, sp), []
    while engine.has_unfinished():
        toks += [t for o in engine.step() if o.request_id == rid for t in o.token_ids]
        engine.pool.check()
    assert engine.stats().drafted_tokens >= 10 and engine.stats().accepted_tokens >= 3
    assert toks == _reference(m, prompt, sp)
    _all_free(engine)


# --- sampling exactness ----------------------------------------------------------------------

def _chi2_critical(df: int, z: float = 3.090) -> float:
    """The chi-square quantile at 1 - alpha for z the normal quantile (3.090: alpha = 0.001),
    by the Wilson-Hilferty cube approximation (within 1% of the exact quantile for df >= 10)."""
    a = 2 / (9 * df)
    return df * (1 - a + z * a ** 0.5) ** 3


def _exact_joint(model, prompt: list[int], sampling: Sampling) -> np.ndarray:
    """P(t1, t2, t3) [V, V, V] of plain sampling after prompt: the model's logits on every
    continuation, tempered and filtered as `jllm.sampling.sample` does."""
    cfg, V = model.cfg, model.cfg.vocab_size
    fwd = jax.jit(forward, static_argnames="cfg")

    def probs(seqs: np.ndarray) -> np.ndarray:                                     # [B, T] -> [B, V]
        B, T = seqs.shape
        lg, _ = fwd(model.params, jnp.asarray(seqs), init_cache(cfg, B, T, jnp.float32), cfg=cfg)
        s = Sampling(*(jnp.repeat(x, B) for x in (sampling.temperature, sampling.top_k, sampling.top_p,
                                                  sampling.min_p)))
        return np.asarray(jax.nn.softmax(_filtered_logits(lg[:, -1], s), axis=-1), np.float64)

    t = np.arange(V)
    p1 = probs(np.asarray([prompt]))[0]                                            # [V]
    p2 = probs(np.concatenate([np.tile(prompt, (V, 1)), t[:, None]], axis=1))      # [V(t1), V]
    pairs = np.stack(np.meshgrid(t, t, indexing="ij"), -1).reshape(V * V, 2)
    p3 = probs(np.concatenate([np.tile(prompt, (V * V, 1)), pairs], axis=1)).reshape(V, V, V)
    return p1[:, None, None] * p2[:, :, None] * p3


def _chi2_rejects(counts: np.ndarray, probs: np.ndarray) -> tuple[bool, float, float]:
    """Pearson's test of counts against probs (same shape), cells expecting under 5 merged into
    one -> (rejected at alpha = 0.001, statistic, critical value)."""
    n = counts.sum()
    expected, counts = n * probs.ravel(), counts.ravel()
    small = expected < 5
    e = np.append(expected[~small], expected[small].sum())
    c = np.append(counts[~small], counts[small].sum())
    stat = float(np.sum((c - e) ** 2 / e))
    crit = _chi2_critical(len(e) - 1)
    return stat > crit, stat, crit


@pytest.fixture(scope="module")
def vocab32(tiny_cfg) -> tuple[Model, list[int]]:
    """The tiny architecture over a 32-token vocabulary (the engine needs 20, its top logprobs),
    random float32 weights with the output doubled (peakier distributions: drafts get accepted),
    and a prompt holding every token (a lookup always drafts) then the model's greedy
    continuation (drafts it is likely to sample)."""
    cfg = dataclasses.replace(tiny_cfg, vocab_size=32, max_seq_len=128)
    flat = random_flat(cfg, seed=3)
    flat["output"] = 2 * flat["output"]
    model = Model(params=from_flat({k: jnp.asarray(v) for k, v in flat.items()}, cfg), cfg=cfg, tokenizer=None,
                  attn_impl="xla", matmul_impl="xla")
    start = np.random.default_rng(0).permutation(32).tolist()
    [r] = jllm.generate(model, [start], max_new_tokens=12, stop_token_ids=[])
    return model, start + r.tokens


SPEC32 = dict(max_seqs=128, page_size=4, num_pages=512, max_tokens_per_step=256, chunk_row=8,
              decode_buckets=(128,), chunk_buckets=(256,), max_prompts_per_step=32, max_model_len=48,
              progress=False)
N_SAMPLES = 4000


def _sample_joint(model, prompt: list[int], sp: SamplingParams, n: int) -> tuple[np.ndarray, Engine]:
    """Counts [V, V, V] of the three tokens of n requests (max_tokens=3, seeds 0..n-1) through a
    speculative engine, and the engine. The first token comes with the prompt; the step after
    verifies one draft, so the second is an accepted draft or a rejection's token, and the third
    the token after an accepted draft (or a plain decode)."""
    V = model.cfg.vocab_size
    engine = Engine(model, **SPEC32, speculative=Speculative(PromptLookup(2), 2))
    outs = engine.generate([prompt] * n, [dataclasses.replace(sp, seed=i) for i in range(n)])
    counts = np.zeros((V, V, V), np.int64)
    for o in outs:
        counts[tuple(o.token_ids)] += 1
    return counts, engine


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.8, 6, 0.9)],
                         ids=["t=1", "t=0.8_topk=6_topp=0.9"])
def test_speculated_samples_have_the_plain_sampling_distribution(vocab32, temperature, top_k, top_p):
    """The joint distribution of the first three tokens of seeded sampled requests through a
    speculative engine (drafts verified and accepted) passes a chi-square test against the exact
    distribution enumerated from the model's logits."""
    sp = SamplingParams(max_tokens=3, temperature=temperature, top_k=top_k, top_p=top_p, stop_token_ids=())
    model, prompt = vocab32
    counts, engine = _sample_joint(model, prompt, sp, N_SAMPLES)
    stats = engine.stats()
    assert stats.drafted_tokens > N_SAMPLES // 2 and stats.accepted_tokens > N_SAMPLES // 10, stats
    exact = _exact_joint(model, prompt, Sampling.make(1, temperature, top_k, top_p))
    rejected, stat, crit = _chi2_rejects(counts, exact)
    assert not rejected, (stat, crit)
    _all_free(engine)


def test_the_chi_square_test_rejects_an_always_accept_rule(vocab32, monkeypatch):
    """The same test catches a wrong rule: accepting every draft skews the distribution."""
    monkeypatch.setattr(step, "_greedy_accept", lambda target, drafts, m: m)
    jax.clear_caches()  # retrace the step with the mutated rule
    try:
        sp = SamplingParams(max_tokens=3, temperature=1.0, stop_token_ids=())
        counts, _ = _sample_joint(vocab32[0], vocab32[1], sp, N_SAMPLES)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    exact = _exact_joint(*vocab32, Sampling.make(1, 1.0))
    rejected, stat, crit = _chi2_rejects(counts, exact)
    assert rejected, (stat, crit)


def _steps(engine: Engine, requests: list[tuple[list[int], SamplingParams]], abort: dict[int, int] | None = None,
           ) -> list[tuple[list[int], str, int]]:
    """Submit requests at once, step to the end, aborting request i after abort[i] steps ->
    (tokens, finish reason, preemptions) per request; checks the page pool after every step."""
    ids = [engine.add_request(p, sp) for p, sp in requests]
    got = {rid: ([], None, 0) for rid in ids}
    step = 0
    while engine.has_unfinished():
        for i, n in (abort or {}).items():
            if n == step:
                engine.abort(ids[i])
        for o in engine.step():
            toks, _, _ = got[o.request_id]
            got[o.request_id] = (toks + o.token_ids, o.finish_reason, o.metrics.preemptions if o.metrics else 0)
        engine.pool.check()
        step += 1
    return [got[rid] for rid in ids]


def test_a_speculating_sampled_request_is_the_same_alone_batched_and_preempted(vocab32):
    """A seeded sampled request under speculation gives generate's tokens run alone, batched with
    greedy and sampled requests, and preempted and recomputed (in a 24-page pool where requests
    of 16 pages each push each other out; one of them aborted); every page comes back and
    nothing compiles after start-up."""
    model, prompt = vocab32
    sp = SamplingParams(max_tokens=20, temperature=1.0, top_p=0.95, seed=7, stop_token_ids=())
    ref = _reference(model, prompt, sp)
    others = [(prompt[i:] + prompt[:i], o) for i, o in (
        (5, SamplingParams(max_tokens=20, stop_token_ids=())),
        (11, SamplingParams(max_tokens=20, temperature=0.8, top_k=5, seed=1, stop_token_ids=())),
        (17, SamplingParams(max_tokens=20, temperature=1.2, seed=2, stop_token_ids=())))]
    refs = [_reference(model, p, o) for p, o in others]
    spec = Speculative(PromptLookup(2), 3)

    engine = Engine(model, **{**KW, "num_pages": 64}, speculative=spec)
    compiled = engine_step._cache_size()
    [alone] = _steps(engine, [(prompt, sp)])
    assert alone == (ref, "length", 0)
    assert engine.stats().accepted_tokens > 0
    got = _steps(engine, others + [(prompt, sp)])
    assert [g[:2] for g in got] == [(r, "length") for r in refs] + [(ref, "length")]
    assert engine.stats().preemptions == 0
    _all_free(engine)
    assert engine_step._cache_size() == compiled

    engine = Engine(model, **KW, speculative=spec)
    compiled = engine_step._cache_size()
    got = _steps(engine, others + [(prompt, sp)], abort={1: 6})
    stats = engine.stats()
    assert stats.preemptions > 0 and got[-1][2] > 0, "the target request was meant to be preempted"
    assert stats.accepted_tokens > 0
    assert got[-1][:2] == (ref, "length")
    assert got[1][1] == "abort" and got[1][0] == refs[1][:len(got[1][0])]
    assert [g[:2] for i, g in enumerate(got[:-1]) if i != 1] == [(refs[0], "length"), (refs[2], "length")]
    _all_free(engine)
    assert engine_step._cache_size() == compiled
