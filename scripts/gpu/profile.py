"""Regions for Nsight Compute, and a summary of what it measured.

    ncu --profile-from-start off ... python -m scripts.gpu gemv-one --bits 8 --k 4096 --n 22016
    ncu --profile-from-start off ... python -m scripts.gpu prefill --prompt-len 2048
    python -m scripts.gpu ncu-summary --file ncu.csv   # time per kernel name

`gemv-one` and `prefill` run their work once after a warm-up between cuProfilerStart and
cuProfilerStop, so `ncu --profile-from-start off` sees exactly that region.
"""
import csv
import ctypes

import jax
import jax.numpy as jnp

from pallas_kernels import _triton
from scripts.gpu.common import header
from scripts.gpu.gemv import VARIANTS, _pallas, group_size_for, random_weight, weight_bytes


def _profiler(call: str) -> None:
    getattr(ctypes.CDLL("libcuda.so.1"), call)()


def gemv_one(args) -> None:
    """One quant_matmul call of variant `--variant` between cuProfilerStart and cuProfilerStop."""
    header()
    bits, k, n, m = args.bits[0], args.k, args.n, args.m[0]
    g = group_size_for(bits, k)
    key = jax.random.key(0)
    q, s = random_weight(key, k, n, bits, g)
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    f = jax.jit(lambda x, q, s: _pallas(x, q, s, bits=bits, group_size=g, block_sizes=VARIANTS[args.variant]))
    with _triton.quiet():
        jax.block_until_ready(f(x, q, s))
    _profiler("cuProfilerStart")
    jax.block_until_ready(f(x, q, s))
    _profiler("cuProfilerStop")
    print(f"profiled int{bits} K={k} N={n} M={m} {args.variant}: {weight_bytes(q, s) / 1e6:.1f} MB")


def prefill(args) -> None:
    """One prefill of a random-weight `--config` model between cuProfilerStart and cuProfilerStop."""
    from jllm import parallel
    from jllm.plan import make_plan
    from jllm.config import LlamaConfig
    from jllm.generate import bucket
    from jllm.generate import prefill as run_prefill
    from jllm.model import init_cache
    from jllm.sampling import Sampling

    header()
    cfg = LlamaConfig.from_name(args.config)
    params = parallel.random_params(cfg, None, jax.random.key(0))
    T = bucket(args.prompt_len)
    tokens = jax.random.randint(jax.random.key(1), (1, T), 3, cfg.vocab_size, jnp.int32)
    n = jnp.full((1,), args.prompt_len, jnp.int32)
    sampling, key = Sampling.make(1), jax.random.key(0)

    def run():
        cache = init_cache(cfg, 1, bucket(T + 128), jnp.bfloat16)
        return run_prefill(params, tokens, n, cache, sampling, key, cfg=cfg,
                           plan=make_plan(cfg, None, args.attn_impl, "xla"))
    with _triton.quiet():
        jax.block_until_ready(run())
        jax.block_until_ready(run())
    _profiler("cuProfilerStart")
    jax.block_until_ready(run())
    _profiler("cuProfilerStop")
    print(f"profiled prefill {args.config} T={T} attn={args.attn_impl}")


def ncu_summary(args) -> None:
    """Total time per kernel name from `ncu --csv --page raw --metrics gpu__time_duration.sum`."""
    lines = open(args.file).read().splitlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{args.file}: no ncu CSV table (did the profiled program run?)")
    rows = list(csv.DictReader(lines[start:]))[1:]  # the row after the header holds units
    totals: dict[str, list[float]] = {}
    for r in rows:
        name = r["Kernel Name"][:60]
        t = totals.setdefault(name, [0.0, 0])
        t[0] += float(r["gpu__time_duration.sum"]) / 1e3  # ns -> us
        t[1] += 1
    total = sum(t for t, _ in totals.values())
    print(f"{len(rows)} kernels, {total:.1f} us in kernels")
    for name, (t, c) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"{t:9.1f} us {100 * t / total:5.1f}% {c:5d}x  {name}")
