"""The GPU benchmark parts added for the H200 rounds, run on CPU: what they compute is right."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllm.config import LlamaConfig
from scripts.gpu import stream, ttft


@pytest.mark.parametrize("tiled", [False, True])
@pytest.mark.parametrize("prefetch", [2, 3])
def test_stream_kernel_sums_every_column_in_either_layout(tiled, prefetch):
    w = jax.random.randint(jax.random.key(0), (256, 512), -1000, 1000, jnp.int32)
    x = stream.to_tiled(w, 64) if tiled else w
    out = stream.read_sum(x, tiled=tiled, bk=32, bn=64, splits=2, prefetch=prefetch, warps=4, interpret=True)
    assert out.shape == (2, 512)
    np.testing.assert_array_equal(out.sum(axis=0), w.sum(axis=0))


def test_to_tiled_keeps_each_column_block_contiguous():
    w = jnp.arange(8 * 12, dtype=jnp.int32).reshape(8, 12)
    t = stream.to_tiled(w, 4)
    assert t.shape == (3, 8, 4)
    np.testing.assert_array_equal(t[1], w[:, 4:8])


def test_ttft_rows_are_timed_and_ordered():
    rows = ttft.measure(ttft.Setup(LlamaConfig.from_name("tiny"), 16), repeats=2)
    assert list(rows) == list(ttft.ROWS)
    assert all(len(v) == 2 and all(t > 0 for t in v) for v in rows.values())
    for name in ("jit", "compiled"):  # the dispatch is part of the synchronous call
        assert all(d <= t for d, t in zip(rows[f"dispatch {name}"], rows[f"{name} pre-made cache"]))


def test_ttft_call_breakdown_splits_each_call_around_its_kernels():
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
            {"ph": "M", "name": "thread_name", "pid": 2, "tid": 7, "args": {"name": "Stream #13"}}]
    calls = [{"ph": "X", "name": ttft.CALL, "pid": 1, "tid": 1, "ts": 0.0, "dur": 10_000.0},
             {"ph": "X", "name": ttft.CALL, "pid": 1, "tid": 1, "ts": 20_000.0, "dur": 5_000.0}]
    kernels = [{"ph": "X", "name": n, "pid": 2, "tid": 7, "ts": ts, "dur": dur}
               for n, ts, dur in [("a", 3_000.0, 2_000.0), ("b", 4_000.0, 2_000.0), ("c", 7_000.0, 1_000.0)]]
    [first, second] = ttft.call_breakdown(meta + calls + kernels)
    assert first == pytest.approx(dict(call=10.0, before=3.0, busy=4.0, idle=1.0, after=2.0, kernels=3))
    assert second == {"call": 5.0}  # no kernel started inside it


def test_ttft_trace_finds_every_traced_call(tmp_path):
    calls = ttft.trace_calls(ttft.Setup(LlamaConfig.from_name("tiny"), 16), 2, str(tmp_path),
                             device="no such device")
    assert len(calls) == 2 and all(set(c) == {"call"} and c["call"] > 0 for c in calls)


def test_loop_timer_calls_the_kernel_once_per_set_and_pass():
    """loop_time_us runs fn on every set in every pass of one on-device loop (after one warm-up
    call, 5 timed calls), with the first argument scaled by exactly 1."""
    from scripts.gpu.timing import loop_time_us
    seen = []

    def fn(x, y):
        jax.debug.callback(lambda v: seen.append(float(v)), x[0])
        return x + y

    sets = [(jnp.full((4,), 2.0), jnp.ones((4,))), (jnp.full((4,), 3.0), jnp.ones((4,)))]
    us = loop_time_us(fn, sets, iters=3)
    assert us > 0
    assert len(seen) == 6 * 3 * len(sets)
    assert sorted(set(seen)) == [2.0, 3.0]


def test_host_table_counts_host_events_inside_the_windows_only():
    from scripts.gpu.step_profile import host_table
    meta = [{"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
            {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}}]
    host = [{"ph": "X", "name": n, "pid": 1, "tid": 1, "ts": ts, "dur": dur}
            for n, ts, dur in [("command_buffer_3", 0.0, 2_000.0), ("command_buffer_12", 10_000.0, 4_000.0),
                               ("launch", 500.0, 1_000.0), ("late", 30_000.0, 9_000.0), ("skip me", 0.0, 5.0)]]
    device = [{"ph": "X", "name": "command_buffer_1", "pid": 2, "tid": 7, "ts": 600.0, "dur": 50_000.0}]
    rows = host_table(meta + host + device, [(0.0, 1_000.0), (10_000.0, 11_000.0)], skip=("skip me",))
    # per window on average: the numbered names group, the device's event and "late" are out
    assert rows == [("command_buffer_N", 1, 3.0), ("launch", 0, 0.5)]


def test_int4_prefill_reports_a_failing_tiling_and_runs_the_rest(monkeypatch, capsys):
    """A prefill tiling that fails (to compile, or against the ref) is reported per shape, the other
    ops, shapes and `jllm bench` paths still run, and the run then ends in one error naming what failed."""
    import argparse
    import functools

    from jllm import cli, quant
    from pallas_kernels import quant_matmul as qmm
    from scripts.gpu import gemv

    bad = qmm.BlockSizes(block_m=128, num_warps=16)
    real_check, default_max = gemv.check, quant.MAX_PALLAS_M_GROUPED

    def check(x, weights, bits, group_size, block_sizes=None):
        if block_sizes is bad:
            raise RuntimeError("out of resources: shared memory")
        return real_check(x, weights, bits, group_size, block_sizes)

    def per_call_us(op, x, weights, trials, reps):
        jax.block_until_ready(op(x, *weights[0]))
        return 10.0

    benches = []

    def bench(argv):
        benches.append((quant.MAX_PALLAS_M_GROUPED, qmm.default_block_sizes(128, 256, 128, 4)))
        if benches[-1][1] is bad:
            raise RuntimeError("out of resources: shared memory")
        return 0

    monkeypatch.setattr(gemv, "SHAPES", ((256, 128), (128, 256)))
    monkeypatch.setattr(gemv, "PREFILL_VARIANTS", {"dot": None, "bad": bad})
    monkeypatch.setattr(gemv, "check", check)
    monkeypatch.setattr(gemv, "_per_call_us", per_call_us)
    monkeypatch.setattr(qmm, "quant_matmul", functools.partial(qmm.quant_matmul, interpret=True))
    monkeypatch.setattr(cli, "main", bench)
    with pytest.raises(RuntimeError, match=r"int4-prefill: 3 failed: bad at K=256 N=128 M=128; "
                                           r"bad at K=128 N=256 M=128; bench through bad"):
        gemv.int4_prefill(argparse.Namespace(m=[128], bench=[128]))
    out = capsys.readouterr().out
    for k, n in gemv.SHAPES:
        for name in ("xla int4", "xla bf16", "dot"):
            assert f"K={k:6d} N={n:6d} M=  128 {name:9s}      10.0 us" in out
        assert f"K={k:6d} N={n:6d} M=  128 bad       FAILED RuntimeError: out of resources" in out
    assert "M=  128 dot            20.0 us/layer" in out and "M=  128 bad " not in out.split("one 7B layer")[1]
    default = qmm.default_block_sizes(128, 256, 128, 4)
    assert [m for m, _ in benches] == [default_max, 1 << 20, 1 << 20]
    assert [bs for _, bs in benches] == [default, default, bad]
    assert "== int4 prefill through bad: FAILED RuntimeError: out of resources" in out
    assert quant.MAX_PALLAS_M_GROUPED == default_max and qmm.default_block_sizes(128, 256, 128, 4) == default


@pytest.mark.parametrize("temperature,greedy", [(0.0, True), (1.0, False)])
def test_engine_decode_step_times_the_greedy_or_the_sampling_program(monkeypatch, temperature, greedy):
    from jllm import parallel
    from jllm.engine import engine as engine_module
    from jllm.generate import Model
    from scripts.gpu.engine import decode_step
    cfg = LlamaConfig.from_name("tiny")
    model = Model(params=parallel.random_params(cfg, None, jax.random.key(0), jnp.float32), cfg=cfg)
    seen, real = [], engine_module.engine_step

    def spy(*args, **kw):
        seen.append(kw.get("greedy", False))
        return real(*args, **kw)

    monkeypatch.setattr(engine_module, "engine_step", spy)
    d = decode_step(model, 4, 40, None, steps=3, temperature=temperature)
    assert d["temperature"] == temperature and d["rows"] == 4 and d["step_ms"] > 0
    assert seen[-3:] == [greedy] * 3   # the timed steps (pure decode)


@pytest.mark.parametrize("m", [1, 3])
def test_tma_gemv_matches_the_matmul_in_mosaic_interpret_mode(m):
    """scripts.gpu tma's wgmma GEMV (TMA pipeline, K split over programs, partials summed) computes
    x @ w for M <= 64 rows, under the Mosaic GPU interpreter on the CPU."""
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from scripts.gpu import tma
    x = jax.random.normal(jax.random.key(m), (m, 512), jnp.bfloat16)
    w = jax.random.normal(jax.random.key(10 + m), (512, 256), jnp.bfloat16)
    y = tma.gemv_wgmma(x, w, tile_k=64, tile_n=64, stages=3, programs=8,
                       interpret=params.InterpretGPUParams())
    ref = np.asarray(x, np.float32) @ np.asarray(w, np.float32)
    assert y.shape == (m, 256) and y.dtype == x.dtype
    assert np.linalg.norm(np.asarray(y, np.float32) - ref) / np.linalg.norm(ref) < 1e-2
    assert tma._splits(8, 4, 8) == 2 and tma._splits(172, 32, 264) == 4 and tma._splits(64, 172, 132) == 1
    with pytest.raises(ValueError, match="do not tile"):
        tma.gemv_wgmma(x[:, :500], w[:500], tile_k=64, tile_n=64, stages=2, programs=8)


def test_tma_int8_gemv_matches_the_dequantized_matmul_in_mosaic_interpret_mode():
    params = pytest.importorskip("jax._src.pallas.mosaic_gpu.interpret.params")
    from scripts.gpu import tma
    x = jax.random.normal(jax.random.key(0), (2, 256), jnp.bfloat16)
    q = jax.random.randint(jax.random.key(1), (256, 128), -127, 128, jnp.int8)
    scale = jax.random.uniform(jax.random.key(2), (1, 128), jnp.float32, 0.5, 1.5).astype(jnp.bfloat16) / 127
    y = tma.gemv_wgmma(x, q, scale, tile_k=64, tile_n=64, stages=2, programs=4,
                            interpret=params.InterpretGPUParams())
    ref = np.asarray(x, np.float32) @ (np.asarray(q, np.float32) * np.asarray(scale, np.float32))
    assert y.shape == (2, 128) and y.dtype == x.dtype
    assert np.linalg.norm(np.asarray(y, np.float32) - ref) / np.linalg.norm(ref) < 1e-2


def test_l2_part_times_the_gemv_cold_and_after_its_weight_was_read(monkeypatch, capsys):
    import types

    from scripts.gpu import l2
    q = jax.random.normal(jax.random.key(1), (64, 32), jnp.bfloat16)
    x = jax.random.normal(jax.random.key(2), (1, 64), jnp.bfloat16)
    # the read leaves the GEMV's result alone and depends on every element of the weight
    assert jnp.array_equal(l2._after_touch(l2._xla_bf16)(x, q, None), x @ q)
    assert int(l2._touch(q, x)) == int(jnp.max(q).astype(jnp.int32))
    monkeypatch.setattr(l2, "SHAPES", {"wo": (4096, 128)})
    l2.main(types.SimpleNamespace(bits=[16]))
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| bf16 | wo |")]
    assert len(rows) == 1 and all(float(c) > 0 for c in rows[0].strip("|").split("|")[2:6])
