"""The engine against `jllm.generate` on each prompt alone: greedy and seeded sampling under
continuous batching, prefix caching, preemption and aborts; page accounting; compile counts;
logprobs; bad input; the offline benchmark.

Every engine here has the same shapes (4 slots, pages of 4 tokens, a pool of 24 pages = 96
tokens, 16 tokens per step in chunk rows of 8), so the step compiles once per bucket for the
whole module; the tiny model is float32, where the paged and static caches agree.
"""
import dataclasses
import json
import os
import subprocess
import sys

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jllm
from jllm.engine import Engine, QueueFull, SamplingParams
from jllm.engine.bench import format_result, run_engine_bench
from jllm.engine.step import engine_step
from jllm.kvcache import init_cache
from jllm.model import forward

KW = dict(max_seqs=4, page_size=4, num_pages=24, max_tokens_per_step=16, chunk_row=8,
          decode_buckets=(2, 4), progress=False)


def _engine(model, **kw) -> Engine:
    return Engine(model, **{**KW, **kw})


def _ids(n: int, rng) -> list[int]:
    return rng.integers(3, 512, n).tolist()


def _reference(model, prompt, params: SamplingParams) -> list[int]:
    """Tokens of `generate` on this prompt alone."""
    [r] = jllm.generate(model, [prompt], max_new_tokens=params.max_tokens, temperature=params.temperature,
                        top_k=params.top_k, top_p=params.top_p, min_p=params.min_p, seed=params.seed,
                        stop_token_ids=list(params.stop_token_ids or []),
                        presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                        repetition_penalty=params.repetition_penalty, logit_bias=dict(params.logit_bias))
    return r.tokens


def _drive(engine: Engine, script: list[tuple[int, list[int], SamplingParams, int | None]], check=None):
    """Run a script of (arrival step, prompt, params, abort after this many steps or None) ->
    {index: (token ids, finish reason)}; `check(engine)` runs after every step."""
    ids, got, step = {}, {}, 0
    while step <= max(a for a, *_ in script) or engine.has_unfinished():
        for i, (arrive, prompt, params, abort) in enumerate(script):
            if arrive == step:
                ids[engine.add_request(prompt, params)] = i
                got[i] = ([], None)
            if abort is not None and arrive + abort == step and i in got:
                engine.abort(next(r for r, j in ids.items() if j == i))
        for out in engine.step():
            toks, reason = got[ids[out.request_id]]
            assert reason is None, f"output after the final one: {out}"
            got[ids[out.request_id]] = (toks + out.token_ids, out.finish_reason)
        if check is not None:
            check(engine)
        step += 1
    return got


def _check_pages(engine: Engine) -> None:
    """Every page is free, owned or cached, once; a page two requests hold is a cached prefix page;
    each slot's block table lists its request's pages, on the host and (once dispatched, as
    every step is here) on the device."""
    engine.pool.check()
    holders = {}
    device_tables = np.asarray(engine.state.tables) if not engine.scheduler.table_writes else None
    for req in engine.scheduler.running:
        assert len(set(req.pages)) == len(req.pages), f"{req.id} holds a page twice"
        np.testing.assert_array_equal(engine.scheduler.tables[req.slot, :len(req.pages)], req.pages)
        assert (engine.scheduler.tables[req.slot, len(req.pages):] == -1).all()
        if device_tables is not None:
            np.testing.assert_array_equal(device_tables[req.slot, :len(req.pages)], req.pages)
        for p in req.pages:
            holders.setdefault(p, []).append(req.id)
    for p, who in holders.items():
        assert engine.pool.refs[p] == len(who), (p, who, engine.pool.refs[p])
        if len(who) > 1:
            assert p in engine.pool.page_key, f"page {p} shared by {who} but not a prefix-cache page"
    slots = [r.slot for r in engine.scheduler.running]
    assert len(set(slots)) == len(slots) and None not in slots


def _check_all_free(engine: Engine) -> None:
    assert not engine.has_unfinished()
    assert engine.pool.used == 0 and not engine.scheduler.running and not engine.scheduler.waiting
    engine.pool.check()
    engine.pool.evict_all()
    assert engine.pool.available() == engine.num_pages == len(engine.pool.free)


def _mixed_script(rng, n: int, params_for) -> list:
    """n requests: lengths 1..30, a third sharing a 9-token prefix, arriving over 12 steps, every
    seventh aborted a few steps in."""
    shared = _ids(9, rng)
    script = []
    for i in range(n):
        prompt = shared + _ids(int(rng.integers(1, 12)), rng) if i % 3 == 0 else _ids(int(rng.integers(1, 31)), rng)
        abort = int(rng.integers(1, 6)) if i % 7 == 3 else None
        script.append((int(rng.integers(0, 12)), prompt, params_for(i), abort))
    return script


# --- equality with generate ----------------------------------------------------------------

@pytest.mark.parametrize("async_scheduling", [True, False], ids=lambda a: f"async={a}")
def test_greedy_matches_generate_under_batching_preemption_and_aborts(tiny_model_no_tokenizer, async_scheduling):
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(0)
    script = _mixed_script(rng, 32, lambda i: SamplingParams(max_tokens=int(rng.integers(1, 17)), stop_token_ids=()))
    engine = _engine(m, async_scheduling=async_scheduling)
    got = _drive(engine, script, check=_check_pages)
    stats = engine.stats()
    assert stats.preemptions > 0, "the pool was meant to force preemption"
    assert stats.prefix_hit_tokens > 0 and stats.aborted == sum(r == "abort" for _, r in got.values()) > 0
    for i, (_, prompt, params, abort) in enumerate(script):
        toks, reason = got[i]
        ref = _reference(m, prompt, params)
        if reason == "abort":
            assert abort is not None and toks == ref[:len(toks)], i
        else:
            assert (toks, reason) == (ref, "length"), i
    _check_all_free(engine)


def test_penalized_requests_match_generate_through_preemption_and_a_shared_prefix(tiny_model_no_tokenizer):
    """Presence/frequency penalties, greedy and sampled, beside plain requests: each request's
    tokens are generate's with its penalties alone, also after it was preempted and recomputed
    (its counts rebuilt from the outputs it recomputes, not from cached pages)."""
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(7)

    def params(i):
        return SamplingParams(max_tokens=int(rng.integers(8, 21)), temperature=[0.0, 1.0][i % 2], seed=i,
                              presence_penalty=[0.0, 1.2, -0.4, 0.0][i % 4],
                              frequency_penalty=[0.0, 0.5, 0.8, 2.0][(i // 2) % 4],
                              repetition_penalty=[1.0, 1.0, 1.4, 0.7, 2.0][i % 5],
                              logit_bias=[{}, {7: 3.0, 9: -100}, {}][i % 3], stop_token_ids=())
    script = [(a, p, sp, None) for a, p, sp, _ in _mixed_script(rng, 24, params)]
    engine = _engine(m)
    got = _drive(engine, script, check=_check_pages)
    assert engine.stats().preemptions > 0
    penalized = 0
    for i, (_, prompt, sp, _) in enumerate(script):
        assert got[i] == (_reference(m, prompt, sp), "length"), i
        penalized += sp.penalized
    assert penalized >= 12
    _check_all_free(engine)
    with pytest.raises(ValueError, match=r"logit_bias has token ids outside \[0, 512\): \[600\]"):
        engine.add_request([1, 2], SamplingParams(max_tokens=2, logit_bias={600: 1.0}))
    # A plain sampled request in the slot a biased one left: no bias left over.
    prompt, plain = script[0][1], SamplingParams(max_tokens=12, temperature=1.0, seed=4, stop_token_ids=())
    [biased] = engine.generate([prompt], dataclasses.replace(plain, logit_bias={5: 100.0}))
    [after] = engine.generate([prompt], plain)
    assert biased.token_ids == [5] * 12 and after.token_ids == _reference(m, prompt, plain)


@pytest.mark.parametrize("temperature,repetition", [(0.0, 1.0), (1.0, 1.0), (0.0, 1.5)])
def test_a_penalized_request_preempted_mid_decode_resumes_with_its_counts(tiny_model_no_tokenizer, temperature,
                                                                          repetition):
    """Two requests of 60 tokens in a pool of 96: the newer is preempted after some outputs,
    its full pages go to the prefix cache, and it resumes by recomputing its outputs (counted
    again) rather than reading them from the cache."""
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(3)
    sp = SamplingParams(max_tokens=40, temperature=temperature, seed=5, presence_penalty=0.7,
                        frequency_penalty=0.9, repetition_penalty=repetition, stop_token_ids=())
    prompts = [_ids(20, rng), _ids(20, rng)]
    engine = _engine(m)
    got = _drive(engine, [(0, prompts[0], sp, None), (1, prompts[1], sp, None)])
    assert engine.stats().preemptions > 0
    for i, prompt in enumerate(prompts):
        assert got[i] == (_reference(m, prompt, sp), "length"), i
    _check_all_free(engine)


def test_seeded_sampling_matches_generate_per_request(tiny_model_no_tokenizer):
    """Per-request temperature/top-k/top-p/seed, mixed with greedy rows, arrivals, aborts and
    preemptions: each request's tokens are generate's with that seed alone (its key chain
    survives recomputation)."""
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(1)

    def params(i):
        if i % 4 == 0:
            return SamplingParams(max_tokens=12, stop_token_ids=())
        return SamplingParams(max_tokens=int(rng.integers(4, 17)), temperature=float(rng.choice([0.7, 1.0, 1.5])),
                              top_k=[None, 5, 50][i % 3], top_p=[None, 0.9][i % 2], seed=int(rng.integers(0, 2 ** 31)),
                              stop_token_ids=())
    script = _mixed_script(rng, 32, params)
    engine = _engine(m)
    got = _drive(engine, script)
    assert engine.stats().preemptions > 0 and engine.stats().aborted > 0
    for i, (_, prompt, sp, _) in enumerate(script):
        toks, reason = got[i]
        ref = _reference(m, prompt, sp)
        assert toks == ref[:len(toks)] if reason == "abort" else (toks, reason) == (ref, "length"), i
    # Same seed, same tokens; another seed, other tokens.
    p = SamplingParams(max_tokens=12, temperature=1.0, seed=5, stop_token_ids=())
    a, b, c = engine.generate([script[1][1]] * 3, [p, p, dataclasses.replace(p, seed=6)])
    assert a.token_ids == b.token_ids != c.token_ids
    # generate's seeds past int32 are the engine's too (s and s - 2**32 are one seed).
    high = dataclasses.replace(p, seed=2 ** 32 - 7)
    e, f = engine.generate([script[1][1]] * 2, [high, dataclasses.replace(p, seed=-7)])
    assert e.token_ids == f.token_ids == _reference(m, script[1][1], high) != a.token_ids
    # A top_k past the vocabulary, even past int32, is no cut (it once overflowed the step's
    # int32 array and stalled every request).
    [d] = engine.generate([script[1][1]], [dataclasses.replace(p, top_k=2 ** 40)])
    assert d.token_ids == a.token_ids


def test_preemption_completes_requests_larger_than_the_pool_shares(tiny_model_no_tokenizer):
    """Four requests of 18 pages each over a 24-page pool: they run one or two at a time,
    preempted and recomputed, and all finish with generate's tokens."""
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(2)
    prompts = [_ids(30, rng) for _ in range(4)]
    sp = SamplingParams(max_tokens=40, stop_token_ids=())
    engine = _engine(m)
    outs = engine.generate(prompts, sp)
    assert engine.stats().preemptions > 0
    assert [o.token_ids for o in outs] == [_reference(m, p, sp) for p in prompts]
    assert all(o.finish_reason == "length" and o.completion_tokens == 40 for o in outs)
    assert any(o.metrics.preemptions for o in outs)
    _check_all_free(engine)


@pytest.mark.parametrize("together", [False, True], ids=lambda t: f"submitted_together={t}")
def test_prefix_cache_prefills_a_shared_system_prompt_once(tiny_model_no_tokenizer, together):
    """Six prompts behind a 16-token system prompt: its pages are computed once (also when all
    arrive together: pages are shared as soon as the step writing them is dispatched)."""
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(3)
    system = _ids(16, rng)  # four full pages
    prompts = [system + _ids(int(rng.integers(1, 9)), rng) for _ in range(6)]
    sp = SamplingParams(max_tokens=6, stop_token_ids=())
    results = {}
    for caching in (True, False):
        engine = _engine(m, prefix_caching=caching)
        outs = engine.generate(prompts, sp) if together else sum(
            (engine.generate(prompts[i:i + 1], sp) for i in range(6)), [])
        s = engine.stats()
        results[caching] = [o.token_ids for o in outs]
        suffixes = sum(len(p) - 16 for p in prompts[1:])
        if caching:
            assert s.prefix_hit_tokens == 16 * 5 and s.prefill_tokens == len(prompts[0]) + suffixes
            assert [o.metrics.cached_prompt_tokens for o in outs] == [0] + [16] * 5
            assert s.prefix_cache_hit_ratio == pytest.approx(80 / sum(map(len, prompts)))
        else:
            assert s.prefix_hit_tokens == 0 and s.prefill_tokens == sum(map(len, prompts))
        _check_all_free(engine)
    assert results[True] == results[False] == [_reference(m, p, sp) for p in prompts]


def test_a_fully_cached_prompt_still_computes_its_last_token(tiny_model_no_tokenizer):
    m = tiny_model_no_tokenizer
    prompt = _ids(16, np.random.default_rng(4))
    sp = SamplingParams(max_tokens=5, stop_token_ids=())
    engine = _engine(m)
    [a] = engine.generate([prompt], sp)
    [b] = engine.generate([prompt], sp)
    assert a.token_ids == b.token_ids == _reference(m, prompt, sp)
    assert b.metrics.cached_prompt_tokens == 12  # three of four pages: the fourth holds the last token


# --- page accounting -----------------------------------------------------------------------

@hypothesis.settings(max_examples=25, deadline=None, suppress_health_check=list(hypothesis.HealthCheck))
@hypothesis.given(st.lists(st.tuples(st.sampled_from(["add", "add", "abort", "step", "step", "step"]),
                                     st.integers(1, 40), st.integers(1, 30), st.booleans()),
                           min_size=1, max_size=40))
def test_pages_are_never_owned_twice_and_all_come_back(tiny_model_no_tokenizer, ops):
    """Random add/abort/step sequences: the accounting invariants hold after every step, and
    when everything has ended every page is free or cached (and eviction frees those)."""
    engine = _engine(tiny_model_no_tokenizer, async_scheduling=True)
    rng = np.random.default_rng(len(ops))
    live = []
    shared = _ids(8, rng)
    for op, n, max_tokens, share in ops:
        if op == "add":
            prompt = (shared + _ids(n, rng))[:60] if share else _ids(n, rng)
            live.append(engine.add_request(prompt, SamplingParams(max_tokens=max_tokens, stop_token_ids=())))
        elif op == "abort" and live:
            engine.abort(live.pop(n % len(live)))
        else:
            for out in engine.step():
                if out.finished and out.request_id in live:
                    live.remove(out.request_id)
            _check_pages(engine)
    while engine.has_unfinished():
        engine.step()
        _check_pages(engine)
    _check_all_free(engine)


def test_device_block_tables_take_the_last_write_of_each_entry(tiny_model, monkeypatch):
    """The scheduler's table writes reach EngineState.tables in order: an entry written twice
    before a step (a slot that changed hands within one schedule) holds its last page, and more
    writes than one device call takes go in several."""
    import jllm.engine.engine as engine_mod
    engine = _engine(tiny_model)
    M = engine.max_pages
    engine.scheduler.table_writes = [(3, 0, [5, 6]), (1, 2, [9]), (3, 0, [7])]
    engine._write_tables()
    tables = np.asarray(engine.state.tables)
    assert tables[3, :2].tolist() == [7, 6] and tables[1, 2] == 9 and engine.scheduler.table_writes == []
    monkeypatch.setattr(engine_mod, "TABLE_WRITES", 7)   # 4 * M entries: many calls
    engine.scheduler.table_writes = [(s, c, [s * M + c]) for s in range(engine.max_seqs) for c in range(M)] * 2
    engine._write_tables()
    assert np.asarray(engine.state.tables).tolist() == np.arange(engine.max_seqs * M).reshape(-1, M).tolist()


# --- compilation, logprobs, text ------------------------------------------------------------

def test_no_compilation_after_start_up(tiny_model):
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    engine = _engine(tiny_model)
    before, n_before = engine_step._cache_size(), len(compiles)
    rng = np.random.default_rng(5)
    ids = []
    for i in range(14):
        sp = SamplingParams(max_tokens=int(rng.integers(1, 20)), temperature=[0.0, 0.8][i % 2], top_k=[None, 7][i % 3 == 0],
                            top_p=[None, 0.5][i % 4 == 0], seed=i, logprobs=[None, 2][i % 5 == 0],
                            stop=["e"] if i % 6 == 0 else ())
        ids.append(engine.add_request(_ids(int(rng.integers(1, 60)), rng) if i % 2 else "Hello there, how", sp))
        if i % 3 == 0:
            engine.step()
        if i == 9:
            engine.abort(ids[4])
    while engine.has_unfinished():
        engine.step()
    assert (engine_step._cache_size(), len(compiles)) == (before, n_before)


def test_compile_workers_compile_each_program_once(tiny_model):
    """Programs compiled ahead in threads are the ones the engine then runs: as many backend
    compiles as one at a time, none after start-up, the same tokens."""
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, secs, **kw: compiles.append(event) if event == "/jax/core/compile/backend_compile_duration" else None)
    shapes = dict(max_tokens_per_step=24, decode_buckets=(2, 6), max_seqs=6)  # compiled by no other test
    prompts = [_ids(n, np.random.default_rng(n)) for n in (3, 17, 30)]
    counts, tokens = [], []
    for workers in (3, 1):
        jax.clear_caches()
        n = len(compiles)
        engine = _engine(tiny_model, compile_workers=workers, **shapes)
        counts.append(len(compiles) - n)
        for p in prompts:
            engine.add_request(p, SamplingParams(max_tokens=9))
        outs = {}
        while engine.has_unfinished():
            for out in engine.step():
                outs.setdefault(out.request_id, []).extend(out.token_ids)
        assert len(compiles) - n == counts[-1]  # nothing compiled after start-up
        tokens.append(sorted(outs.values()))
    assert counts[0] == counts[1] > 8 and tokens[0] == tokens[1]


def test_default_compile_workers(monkeypatch):
    """8 threads on a GPU, fewer where the process may use fewer CPUs; 1 elsewhere."""
    from jllm.engine import engine as engine_module
    assert engine_module.default_compile_workers() == 1  # the CPU
    monkeypatch.setattr(engine_module.jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(engine_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert engine_module.default_compile_workers() == 8
    monkeypatch.setattr(engine_module.os, "sched_getaffinity", lambda pid: {0, 1, 2}, raising=False)
    assert engine_module.default_compile_workers() == 3


def test_a_failed_threaded_compile_goes_on_one_at_a_time(tiny_model, monkeypatch):
    """If compiling in threads fails (e.g. device memory for several autotuners at once), the engine
    warns and compiles one at a time: it starts, and serves."""
    real = Engine._step_program

    def failing(self, *program, compile_only=False):
        if compile_only:
            raise MemoryError("RESOURCE_EXHAUSTED: out of memory while autotuning")
        return real(self, *program)

    monkeypatch.setattr(Engine, "_step_program", failing)
    with pytest.warns(RuntimeWarning, match="2 at a time failed .*MemoryError.*one at a time"):
        engine = _engine(tiny_model, compile_workers=2)
    [out] = engine.generate([_ids(5, np.random.default_rng(1))], SamplingParams(max_tokens=4))
    assert len(out.token_ids) == 4


@pytest.mark.parametrize("taken,budget,want", [
    (0, 512, 512),    # the whole budget fills the 512 bucket
    (0, 312, 256),    # 312 would pad 200 rows of 512: stop at 256
    (0, 400, 400),    # 400 pads 112 of 512 (under a quarter): keep
    (0, 100, 100),    # below the smallest bucket: nothing to fall back to
    (0, 0, 0),
    (300, 12, 312),   # 312 in all, but drafts already hold 300: keep
    (100, 212, 256),  # 312 in all -> 256, of which 100 are taken
])
def test_prompt_chunks_stop_at_a_bucket_rather_than_pad_a_quarter(taken, budget, want):
    from jllm.engine.pages import PagePool
    from jllm.engine.scheduler import Scheduler, StepShapes
    shapes = StepShapes((64, 256), (128, 256, 512), 128, 4)
    sched = Scheduler(PagePool(64), 16, 256, 8, 768, shapes)
    assert sched._chunk_cap(taken, budget) == want
    assert sched._chunk_cap(taken, budget, pending=10_000) == want
    # every pending prompt token fits: no cap, so no prompt is split for the padding's sake
    assert sched._chunk_cap(taken, budget, pending=budget) == taken + min(budget, 512 - taken)


def test_prompt_chunks_fill_the_budget_beside_the_whole_decode_bucket():
    """7 decodes are computed as the 8 rows of their bucket: a 32-token budget leaves 24 prompt
    tokens (a 32-token step, the 24 bucket) rather than 25 padded to 32 (a 40-token step)."""
    from jllm.engine.api import SamplingParams
    from jllm.engine.pages import PagePool
    from jllm.engine.scheduler import Request, Scheduler, default_shapes
    from jllm.streaming import Row
    shapes = default_shapes(8, 32, 4, 8)
    assert shapes.decode_buckets == (2, 8) and shapes.chunk_buckets == (4, 8, 16, 24, 32)
    assert default_shapes(64, 512, None, 4).chunk_buckets == (128, 256, 512)  # 448: not a row multiple
    sched = Scheduler(PagePool(256, prefix_caching=False), 4, 8, 64, 32, shapes)

    def request(i, n):
        prompt = list(range(3 + i, 3 + i + n))
        return Request(f"r{i}", prompt, SamplingParams(max_tokens=20), Row(i, prompt, None, [], set(), 20), 0.0)

    for i in range(7):
        sched.add(request(i, 4))
    first = sched.schedule()
    assert len(first.chunks) == 7 and all(p.samples for p in first.chunks)
    for p in first.chunks:  # their first samples are read back: now they decode
        p.req.tokens.append(1)
        p.req.pending -= 1
    sched.add(request(7, 100))
    step = sched.schedule()
    assert len(step.decodes) == 7
    assert [p.n for p in step.chunks] == [24]


def test_greedy_decode_steps_take_the_greedy_program(tiny_model, monkeypatch):
    """Pure decode steps of greedy requests without logprobs run the program that traces no sort;
    a sampled request or one asking for logprobs puts its steps back on the full program. The
    tokens are generate's either way."""
    import jllm.engine.engine as engine_mod
    flags = []

    def spy(*args, greedy=False, **kw):
        flags.append(greedy)
        return engine_step(*args, greedy=greedy, **kw)

    engine = _engine(tiny_model)
    monkeypatch.setattr(engine_mod, "engine_step", spy)
    rng = np.random.default_rng(11)
    prompts = [_ids(n, rng) for n in (5, 23, 40)]
    greedy = SamplingParams(max_tokens=12, stop_token_ids=())
    outs = engine.generate(prompts, greedy)
    assert [o.token_ids for o in outs] == [_reference(tiny_model, p, greedy) for p in prompts]
    assert True in flags and False in flags  # prompt chunks on the full program, decodes on the greedy one
    # The other request outlives the greedy one, so no step of this call may take the greedy program.
    for other in (SamplingParams(max_tokens=16, temperature=0.9, seed=3, stop_token_ids=()),
                  SamplingParams(max_tokens=16, logprobs=2, stop_token_ids=())):
        flags.clear()
        [a, b] = engine.generate([prompts[0], prompts[1]], [greedy, other])
        assert a.token_ids == _reference(tiny_model, prompts[0], greedy)
        assert b.token_ids == _reference(tiny_model, prompts[1], other)
        assert flags and not any(flags)


def test_temperature_only_decode_steps_run_the_program_without_the_sort(tiny_model_no_tokenizer, monkeypatch):
    """Decode steps whose rows sample with temperature alone (OpenAI's default) run the program
    without top-k/top-p/min-p (static filtered=False: no sort over the vocabulary); a row with a
    cut brings the full one back. Tokens are generate's either way."""
    import jllm.engine.engine as engine_mod
    m = tiny_model_no_tokenizer
    seen, real = [], engine_mod.engine_step

    def spy(*a, **k):
        seen.append((a[2].tok_row.shape[0] == 0, k["greedy"], k["filtered"]))
        return real(*a, **k)

    engine = _engine(m)
    monkeypatch.setattr(engine_mod, "engine_step", spy)
    prompts = [_ids(n, np.random.default_rng(n)) for n in (5, 9)]
    plain = [SamplingParams(max_tokens=10, temperature=0.8, seed=s, stop_token_ids=()) for s in (1, 2)]
    outs = engine.generate(prompts, plain)
    assert any(decode and not greedy and not filtered for decode, greedy, filtered in seen)
    for p, sp, o in zip(prompts, plain, outs):
        assert o.token_ids == _reference(m, p, sp)
    seen.clear()
    cut = [dataclasses.replace(plain[0], top_p=0.9), plain[1]]
    outs = engine.generate(prompts, cut)
    assert all(filtered for decode, greedy, filtered in seen)
    for p, sp, o in zip(prompts, cut, outs):
        assert o.token_ids == _reference(m, p, sp)


def test_min_p_requests_sample_as_generate_does(tiny_model_no_tokenizer):
    """min_p is a per-row value like top_p: requests with different min_p (and none) in one batch
    each give generate's tokens for their seed; min_p = 1 keeps only the most likely token."""
    m, rng = tiny_model_no_tokenizer, np.random.default_rng(21)
    prompts = [_ids(6, rng), _ids(9, rng), _ids(4, rng)]
    params = [SamplingParams(max_tokens=10, temperature=1.3, seed=s, min_p=mp, stop_token_ids=())
              for s, mp in ((1, 0.2), (2, None), (3, 1.0))]
    outs = _engine(m).generate(prompts, params)
    for prompt, sp, out in zip(prompts, params, outs):
        assert out.token_ids == _reference(m, prompt, sp)
    greedy = _reference(m, prompts[2], SamplingParams(max_tokens=10, stop_token_ids=()))
    assert outs[2].token_ids == greedy
    assert _reference(m, prompts[0], params[0]) != _reference(m, prompts[0], dataclasses.replace(params[0], min_p=None))


def test_logprobs_are_the_models_log_softmax(tiny_model_no_tokenizer):
    m = tiny_model_no_tokenizer
    prompt = _ids(7, np.random.default_rng(6))
    sp = SamplingParams(max_tokens=5, temperature=1.0, seed=3, logprobs=3, stop_token_ids=())
    [out] = _engine(m).generate([prompt], sp)
    assert len(out.logprobs) == 5 and [t for t, _, _ in out.logprobs] == out.token_ids
    seq = prompt + out.token_ids
    lg, _ = jax.jit(forward, static_argnames="cfg")(m.params, jnp.asarray([seq]), init_cache(m.cfg, 1, 16, jnp.float32),
                                                      cfg=m.cfg)
    ref = np.asarray(jax.nn.log_softmax(lg[0], axis=-1))                            # [T, V]
    for k, (tok, lp, top) in enumerate(out.logprobs):
        row = ref[len(prompt) - 1 + k]
        assert lp == pytest.approx(row[tok], abs=1e-4)
        assert [t for t, _ in top] == np.argsort(-row)[:3].tolist()
        np.testing.assert_allclose([v for _, v in top], np.sort(row)[::-1][:3], atol=1e-4)


def test_a_stop_tokens_logprob_comes_with_the_final_output(tiny_model_no_tokenizer):
    """Stopping on a token id: the token is not among the output's ids, but its logprob is the
    last entry (lm-eval reads one entry per generated token, the stop token included)."""
    m = tiny_model_no_tokenizer
    prompt = _ids(9, np.random.default_rng(9))
    sp = SamplingParams(max_tokens=8, logprobs=2, stop_token_ids=())
    [plain] = _engine(m).generate([prompt], sp)
    stop = plain.token_ids[3]
    [out] = _engine(m).generate([prompt], dataclasses.replace(sp, stop_token_ids=(stop,)))
    first = plain.token_ids.index(stop)
    assert out.finish_reason == "stop" and out.token_ids == plain.token_ids[:first]
    assert [t for t, _, _ in out.logprobs] == plain.token_ids[:first + 1]
    assert out.logprobs[-1][1] == pytest.approx(plain.logprobs[first][1], abs=1e-6)


def _prompt_log_softmax(m, prompt) -> np.ndarray:
    """[T, V] log-probabilities after each prompt token, from one float32 forward."""
    T = 64
    tokens = np.zeros((1, T), np.int32)
    tokens[0, :len(prompt)] = prompt
    lg, _ = jax.jit(forward, static_argnames="cfg")(m.params, jnp.asarray(tokens), init_cache(m.cfg, 1, T, jnp.float32),
                                                      cfg=m.cfg)
    return np.asarray(jax.nn.log_softmax(lg[0], axis=-1))


def test_prompt_logprobs_are_the_models_over_chunks_prefix_sharing_and_preemption(tiny_model_no_tokenizer):
    """prompt_logprobs N: entry i is prompt token i's log-probability after tokens < i and the N
    best there (None for i = 0), whatever chunks computed it; two requests with one prefix both
    get all of theirs (no prefix-cache hit), and so does a request preempted before its first
    output went out; other requests' tokens are unchanged, and no program compiles after start."""
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(8)
    shared = _ids(12, rng)
    prompts = [shared + _ids(30, rng), shared + _ids(5, rng), _ids(40, rng), _ids(20, rng)]
    params = [SamplingParams(max_tokens=30, prompt_logprobs=k, stop_token_ids=()) for k in (3, 0, 20)] + \
        [SamplingParams(max_tokens=30, stop_token_ids=())]
    engine = _engine(m, prompt_logprobs=True)
    before = engine_step._cache_size()
    outs = engine.generate(prompts, params)
    assert engine_step._cache_size() == before
    assert engine.stats().preemptions > 0
    for prompt, sp, out in zip(prompts, params, outs):
        assert out.token_ids == _reference(m, prompt, sp)
        if sp.prompt_logprobs is None:
            assert out.prompt_logprobs is None
            continue
        ref = _prompt_log_softmax(m, prompt)
        assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
        for i, (tok, lp, top) in enumerate(out.prompt_logprobs[1:], start=1):
            row = ref[i - 1]
            assert tok == prompt[i] and lp == pytest.approx(row[tok], abs=1e-4)
            assert [t for t, _ in top] == np.argsort(-row)[:sp.prompt_logprobs].tolist()
    _check_all_free(engine)
    with pytest.raises(ValueError, match="prompt_logprobs=True"):
        _engine(m).add_request([1, 2], SamplingParams(max_tokens=4, prompt_logprobs=1))


def test_text_and_stop_strings_match_generate(tiny_model):
    [ref] = jllm.generate(tiny_model, "The quick brown fox", max_new_tokens=30, stop_token_ids=[])
    text = ref.text
    start = next(i for i in range(6, len(text) - 3) if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip())
    stop = text[start:start + 3]
    engine = _engine(tiny_model)
    rid = engine.add_request("The quick brown fox", SamplingParams(max_tokens=30, stop=(stop,), stop_token_ids=()))
    pieces, final = [], None
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            pieces.append(o.text)
            final = o
    [want] = jllm.generate(tiny_model, "The quick brown fox", max_new_tokens=30, stop=[stop], stop_token_ids=[])
    assert "".join(pieces) == want.text == text[:text.find(stop)]
    assert final.finish_reason == "stop" and final.completion_tokens == len(want.tokens)
    assert final.metrics.ttft_s >= final.metrics.queue_s >= 0


def test_int8_pages_stay_close_to_float(tiny_model_no_tokenizer):
    m = tiny_model_no_tokenizer
    rng = np.random.default_rng(7)
    prompts = [_ids(int(rng.integers(3, 30)), rng) for _ in range(8)]
    sp = SamplingParams(max_tokens=6, stop_token_ids=())
    q = _engine(m, kv_cache_dtype="int8", decode_buckets=(4,), chunk_buckets=(16,))
    assert q.state.k_pages[0].dtype == jnp.int8
    outs = q.generate(prompts, sp)
    agree = [o.token_ids[:3] == _reference(m, p, sp)[:3] for o, p in zip(outs, prompts)]
    assert sum(agree) >= 7, agree


# --- bad input -----------------------------------------------------------------------------

@pytest.mark.parametrize("kw, exc, name", [
    (dict(max_tokens=0), ValueError, "max_tokens"), (dict(max_tokens=2.0), TypeError, "max_tokens"),
    (dict(temperature=-1), ValueError, "temperature"), (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(top_k=0), ValueError, "top_k"), (dict(top_p=1.5), ValueError, "top_p"), (dict(top_p=0), ValueError, "top_p"),
    (dict(seed=2 ** 40), ValueError, "seed"), (dict(seed="1"), TypeError, "seed"), (dict(stop=[""]), ValueError, "stop"),
    (dict(stop=[3]), TypeError, "stop"), (dict(stop_token_ids=["a"]), TypeError, "stop_token_ids"),
    (dict(logprobs=21), ValueError, "logprobs"), (dict(logprobs=True), TypeError, "logprobs"),
    (dict(presence_penalty=2.5), ValueError, "presence_penalty"), (dict(frequency_penalty="1"), TypeError,
                                                                   "frequency_penalty"),
    (dict(repetition_penalty=0.0), ValueError, "repetition_penalty"), (dict(prompt_logprobs=21), ValueError,
                                                                       "prompt_logprobs"),
    (dict(logit_bias={1: 200}), ValueError, "logit_bias"), (dict(logit_bias={-1: 1}), ValueError, "logit_bias"),
    (dict(logit_bias=[(1, 1), (1, 2)]), ValueError, "logit_bias"), (dict(logit_bias=5), TypeError, "logit_bias"),
    (dict(logit_bias={i: 1 for i in range(301)}), ValueError, "logit_bias"),
])
def test_bad_sampling_params_name_the_field(kw, exc, name):
    with pytest.raises(exc, match=rf"SamplingParams\.{name}="):
        SamplingParams(**kw)


def test_bad_prompts_and_a_full_queue_are_refused(tiny_model, tiny_model_no_tokenizer):
    engine = _engine(tiny_model, max_queue=2)
    for prompt, exc, match in [("", ValueError, "empty string"), ([], ValueError, "empty token list"),
                               ([1, 512], ValueError, "outside"), (3, TypeError, "prompt must be"),
                               ([1.0, 2.0], TypeError, "prompt must be"), (list(range(3, 100)), ValueError, "pages")]:
        with pytest.raises(exc, match=match):
            engine.add_request(prompt, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request([5] * 10, SamplingParams(max_tokens=510))
    with pytest.raises(TypeError, match="SamplingParams"):
        engine.add_request([5], dict(max_tokens=3))
    sp = SamplingParams(max_tokens=4)
    engine.add_request([5, 6], sp, request_id="a")
    with pytest.raises(ValueError, match="already"):
        engine.add_request([5, 6], sp, request_id="a")
    engine.add_request([5, 6], sp)
    with pytest.raises(QueueFull):
        engine.add_request([5, 6], sp)
    # An aborted id is taken again only after step() has handed out its final output: the two
    # requests' outputs would otherwise come out of one step under one id.
    engine.abort("a")
    with pytest.raises(ValueError, match="aborted"):
        engine.add_request([5, 6], sp, request_id="a")
    assert [(o.request_id, o.finish_reason) for o in engine.step() if o.request_id == "a"] == [("a", "abort")]
    engine.add_request([5, 6], sp, request_id="a")
    with pytest.raises(ValueError, match="tokenizer"):
        _engine(tiny_model_no_tokenizer).add_request([5], SamplingParams(max_tokens=4, stop=("x",)))
    for kw, match in [(dict(max_tokens_per_step=2), "max_tokens_per_step"), (dict(memory_fraction=0), "memory_fraction"),
                      (dict(kv_cache_dtype="fp8"), "kv_cache_dtype"), (dict(decode_buckets=(1, 2)), "decode_buckets"),
                      (dict(num_pages=0), "num_pages")]:
        with pytest.raises(ValueError, match=match):
            _engine(tiny_model, **kw)


# --- the offline benchmark -----------------------------------------------------------------

def test_offline_bench_runs_and_reports_sane_numbers(tiny_model_no_tokenizer, tmp_path):
    png = tmp_path / "plots" / "timeline.png"  # a directory that does not exist yet
    r = run_engine_bench(tiny_model_no_tokenizer, n_requests=10, prompt_len=(4, 24), output_len=(2, 10), seed=0,
                         baseline_batch=4, plot=str(png), engine_kwargs=KW)
    assert r.output_tokens == sum(r.output_lens) and len(r.output_lens) == 10
    assert all(2 <= n <= 10 for n in r.output_lens) and all(4 <= n <= 24 for n in r.prompt_lens)
    assert r.output_tokens_per_s > 0 and r.total_tokens_per_s > r.output_tokens_per_s
    assert 0 < r.ttft_s["p50"] <= r.ttft_s["p90"] <= r.ttft_s["p99"] <= r.elapsed_s
    assert 0 <= r.tpot_s["p50"] <= r.tpot_s["p99"]
    assert 0 < r.peak_pages <= 24 and r.timeline and r.baseline_output_tokens_per_s > 0
    assert r.speedup == pytest.approx(r.output_tokens_per_s / r.baseline_output_tokens_per_s)
    assert png.read_bytes()[:4] == b"\x89PNG"
    table = format_result(r)
    assert "output tok/s" in table and "TTFT" in table


def test_add_requests_adds_all_or_none(tiny_model_no_tokenizer):
    engine = _engine(tiny_model_no_tokenizer, max_queue=3)
    sp = SamplingParams(max_tokens=4, stop_token_ids=())
    engine.add_request([1, 2], sp)
    with pytest.raises(QueueFull, match="max_queue=3"):
        engine.add_requests([([3, 4], sp, None)] * 3)
    with pytest.raises(ValueError, match="outside"):
        engine.add_requests([([3, 4], sp, "a"), ([3, 10 ** 6], sp, "b")])
    assert list(engine.requests) == ["req-0"] and len(engine.scheduler.waiting) == 1
    ids = engine.add_requests([([3, 4], sp, "a"), ([5], sp, None)])
    assert ids[0] == "a" and len(engine.scheduler.waiting) == 3
    while engine.has_unfinished():
        engine.step()
    assert engine.stats().aborted == 0
    _check_all_free(engine)


# --- tensor parallelism --------------------------------------------------------------------

def test_engine_on_a_tp2_mesh_matches_generate_on_one_device(tmp_path):
    """A subprocess with 2 CPU devices (tests/engine_tp_worker.py): KV heads split, and replicated;
    greedy and penalized sampled rows; no step program compiles after start-up."""
    out = tmp_path / "tp.json"
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), "engine_tp_worker.py")
    proc = subprocess.run([sys.executable, worker, str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["split"]["got"] == res["split"]["want"] and not res["split"]["kv_replicated"]
    assert res["split"]["page_shards"] == [[40, 4, 1, 16]] * 2      # 2 KV heads, one per device
    assert res["replicated"]["got"] == res["replicated"]["want"] and res["replicated"]["kv_replicated"]
    for part in ("split", "replicated"):
        assert res[part]["got_pen"] == res[part]["want_pen"], part
        assert res[part]["compiled_later"] == 0, part   # the state keeps the shardings compiled for
        assert res[part]["bias_kept"] and res[part]["got_after"] == res[part]["want"][:2], part
        assert res[part]["guided_tokens"][-2:] == [7, 7], part   # sampled after the bias was set


def test_prefix_cache_keys_are_sha256_chains_of_page_and_prefix():
    """A page's key digests its tokens and its parent's key: equal pages after different prefixes
    differ, the chain is deterministic, and it is a 32-byte SHA-256 digest (a hit is trusted
    without comparing tokens, so the key must not be forgeable like Python's hash())."""
    from jllm.engine.pages import block_hash
    a, b, page = block_hash(None, [1, 2, 3, 4]), block_hash(None, [1, 2, 3, 5]), [7, 8, 9, 10]
    assert len(a) == 32 and a != b and block_hash(None, [1, 2, 3, 4]) == a
    assert block_hash(a, page) != block_hash(b, page) and block_hash(a, page) == block_hash(a, list(page))
    assert block_hash(None, page) != block_hash(a, page)
