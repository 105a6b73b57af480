"""The engine with prompt-lookup speculation against `jllm.generate` on each prompt alone:
greedy tokens equal (drafts accepted), stop ids and max_tokens exact, seeded sampled rows equal
and distributed as plain sampling (a chi-square test), page accounting, no compilation after start-up, bad options refused.

Shapes as in test_engine.py (4 slots, pages of 4 tokens, 24 pages, 16 tokens per step in chunk
rows of 8); prompts repeat a random n-gram so that drafts are found and accepted.
"""
import jax
import numpy as np
import pytest

import jllm
from jllm.engine import Engine, SamplingParams
from jllm.engine.step import engine_step
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
