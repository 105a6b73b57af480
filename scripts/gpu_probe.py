"""GPU probes for kernel tuning: loop-timed GEMV variants, and one region for ncu to profile.

    python scripts/gpu_probe.py gemv [--bits 8 4] [--m 1 8]   # table of us and TB/s per variant
    python scripts/gpu_probe.py gemv-multi [--bits 8 4 16] [--m 1 8]  # q/k/v, gate/up: 1 call vs N
    ncu --profile-from-start off ... python scripts/gpu_probe.py gemv-one --bits 8 --k 4096 --n 22016
    ncu --profile-from-start off ... python scripts/gpu_probe.py prefill --prompt-len 2048
    python scripts/gpu_probe.py ncu-summary --file ncu.csv   # time per kernel name

`gemv` times each op inside one jitted loop over rotated weight sets (>= 3x the L2), so the figure
is kernel time plus the launch gap between kernels, as in a decode step, without per-call host
dispatch. `gemv-one` and `prefill` run their work once after a warm-up between cuProfilerStart and
cuProfilerStop, so `ncu --profile-from-start off` sees exactly that region.
"""
import argparse
import ctypes
import functools
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from jllm.bench import best_time  # noqa: E402
from pallas_kernels import quant_matmul as qmm  # noqa: E402
from pallas_kernels._triton import quiet  # noqa: E402

PEAK_TBS = 3.13
VARIANTS = {  # name -> BlockSizes (None: the default for the shape)
    "default": None,
    "no-asm": qmm.BlockSizes(block_n=128, block_k=32, prefetch=3, asm=False),
    "n128k64p2": qmm.BlockSizes(block_n=128, block_k=64, prefetch=2),
    "n128k32p3t792": qmm.BlockSizes(block_n=128, block_k=32, prefetch=3, target_programs=792),
    "n128k32p3t1056": qmm.BlockSizes(block_n=128, block_k=32, prefetch=3, target_programs=1056),
    "n128k64p3t1056": qmm.BlockSizes(block_n=128, block_k=64, prefetch=3, target_programs=1056),
    "n256k32p2": qmm.BlockSizes(block_n=256, block_k=32, prefetch=2),
    "n128k16p4t1056": qmm.BlockSizes(block_n=128, block_k=16, prefetch=4, target_programs=1056),
    "n64k64p3t1056w2": qmm.BlockSizes(block_n=64, block_k=64, prefetch=3, num_warps=2,
                                      target_programs=1056),
    "n128k128p2t1056w8": qmm.BlockSizes(block_n=128, block_k=128, prefetch=2, num_warps=8,
                                        target_programs=1056),
    "int8-fused-sum": qmm.BlockSizes(block_n=256, block_k=32, prefetch=2, fused_reduce=True),
    "int4-fused-sum": qmm.BlockSizes(block_n=128, block_k=128, prefetch=2, fused_reduce=True),
    "n64k32p3": qmm.BlockSizes(block_n=64, block_k=32, prefetch=3),
    "n128k16p3": qmm.BlockSizes(block_n=128, block_k=16, prefetch=3),
    "n64k64p2w2": qmm.BlockSizes(block_n=64, block_k=64, prefetch=2, num_warps=2),
}


def _profiler(call: str) -> None:
    getattr(ctypes.CDLL("libcuda.so.1"), call)()


def _xla_bf16(x, w, s):
    return x @ w


def _xla_int8(x, q, s):
    return (x @ q.astype(x.dtype)) * s


def _pallas(x, q, s, *, bits, group_size, block_sizes):
    return qmm.quant_matmul(x, q, s, bits=bits, group_size=group_size, block_sizes=block_sizes)


def loop_time(op, x, weights, iters: int = 20) -> float:
    """Microseconds per op: one jitted loop applies op(x, *w) to every weight set w, `iters` times
    (w is (q, scale), or for gemv-multi a tuple of them)."""
    @jax.jit
    def run(x, ws, tiny):
        def body(i, ys):
            xi = x * (1 + tiny * i).astype(x.dtype)  # loop-variant, so no call is hoisted
            return tuple(op(xi, *w) for w in ws)
        init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(body, 0, None))
        return jax.lax.fori_loop(0, iters, body, init)

    tiny = jnp.float32(0)
    with quiet():
        return best_time(lambda: run(x, weights, tiny), 5) / (iters * len(weights)) * 1e6


def weight_groups(key, k, ns, bits, group_size, min_bytes=160e6) -> list[tuple]:
    """Sets of one random (q, scale) [K, N] per N in ns; enough sets that a pass reads >= 3x L2."""
    def group(kk):
        return tuple(qmm._random_weight(jax.random.fold_in(kk, i), k, n, bits, group_size)
                     for i, n in enumerate(ns))
    first = group(key)
    count = max(2, min(32, math.ceil(min_bytes / sum(qmm._weight_bytes(*w) for w in first))))
    return [first] + [group(kk) for kk in jax.random.split(key, count)[1:]]


def weight_sets(key, k, n, bits, group_size, min_bytes=160e6):
    return [w for (w,) in weight_groups(key, k, (n,), bits, group_size, min_bytes)]


def cmd_gemv(args) -> None:
    key = jax.random.key(0)
    rows = []
    for bits in args.bits:
        for k, n in qmm.SHAPES:
            g = {8: k, 4: 128, 16: 0}[bits]
            ws = weight_sets(key, k, n, bits, g)
            nbytes = qmm._weight_bytes(*ws[0])
            w16 = weight_sets(key, k, n, 16, 0) if bits == 8 else None
            for m in args.m:
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
                ops = {}
                if bits == 16:
                    ops["xla-bf16"] = (_xla_bf16, ws)
                if w16 is not None:
                    ops["xla-bf16"] = (_xla_bf16, w16)
                    ops["xla-int8"] = (_xla_int8, ws)
                for name, bs in VARIANTS.items():
                    if (m > 1 and name != "default") or (args.variants and name not in args.variants):
                        continue
                    ops[name] = (functools.partial(_pallas, bits=bits, group_size=g, block_sizes=bs), ws)
                for name, (op, w) in ops.items():
                    try:
                        if name not in ("xla-bf16", "xla-int8"):
                            qmm._check(x, *w[0], bits, g, VARIANTS[name])
                        us = loop_time(op, x, w)
                        b = qmm._weight_bytes(*w[0])
                        line = (bits, k, n, m, name, us, b / us / 1e6)
                    except Exception as e:  # a variant that fails is reported, not fatal
                        print(f"int{bits} K={k} N={n} M={m} {name}: ERROR {type(e).__name__}: "
                              f"{str(e)[:300]}", flush=True)
                        continue
                    rows.append(line)
                    print(f"int{bits} K={k:5d} N={n:5d} M={m:2d} {name:15s} {us:7.1f} us "
                          f"{line[6]:5.2f} TB/s", flush=True)
            del ws, w16, nbytes
    print("\nper layer (four shapes), us and TB/s:")
    for bits in args.bits:
        for m in args.m:
            for name in ["xla-bf16", "xla-int8", *VARIANTS]:
                sel = [r for r in rows if r[0] == bits and r[3] == m and r[4] == name]
                if len(sel) == len(qmm.SHAPES):
                    us = sum(r[5] for r in sel)
                    tb = sum(r[5] * r[6] for r in sel) / us
                    print(f"int{bits} M={m:2d} {name:15s} {us:7.1f} us/layer {tb:5.2f} TB/s "
                          f"({100 * tb / PEAK_TBS:3.0f}%)")


# Weights that read the same x, per shard: name -> (K, N of each weight).
MULTI_SHAPES = {
    "7b q/k/v": (4096, (4096, 4096, 4096)),
    "7b gate/up": (4096, (11008, 11008)),
    "70b-tp2 q/k/v": (8192, (4096, 512, 512)),
    "70b-tp2 gate/up": (8192, (14336, 14336)),
}


def _separate(x, *ws, bits, group_size):
    return tuple(_pallas(x, q, s, bits=bits, group_size=group_size, block_sizes=None)
                 for q, s in ws)


def _multi(x, *ws, bits, group_size):
    return qmm.quant_matmul_multi(x, ws, bits=bits, group_size=group_size)


def _xla_separate(x, *ws, bits, group_size):
    """bf16 weights through XLA, one dot each: what the model does without pallas-fused."""
    del bits, group_size
    return tuple(x @ w for w, _ in ws)


def cmd_gemv_multi(args) -> None:
    """Weights sharing x (q/k/v, gate/up): one quant_matmul per weight vs one quant_matmul_multi."""
    key = jax.random.key(0)
    for bits in args.bits:
        for name, (k, ns) in MULTI_SHAPES.items():
            g = {8: k, 4: 128, 16: 0}[bits]
            groups = weight_groups(key, k, ns, bits, g)
            nbytes = sum(qmm._weight_bytes(*w) for w in groups[0])
            for m in args.m:
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
                with quiet():
                    err = qmm._check_multi(x, groups[0], bits, g)
                print(f"int{bits} {name} K={k} N={'+'.join(map(str, ns))} M={m}: "
                      f"multi rel err {err:.1e}", flush=True)
                times = {}
                ops = (("separate", _separate), ("multi", _multi))
                if bits == 16:
                    ops += (("xla", _xla_separate),)
                for op_name, op in ops:
                    op = functools.partial(op, bits=bits, group_size=g)
                    times[op_name] = us = loop_time(op, x, groups)
                    print(f"int{bits} {name:16s} M={m} {op_name:8s} {us:7.1f} us "
                          f"{nbytes / us / 1e6:5.2f} TB/s", flush=True)
                print(f"int{bits} {name:16s} M={m} multi/separate "
                      f"{times['multi'] / times['separate']:.3f}"
                      + (f", multi/xla {times['multi'] / times['xla']:.3f}" if "xla" in times else ""),
                      flush=True)
            del groups


def cmd_gemv_one(args) -> None:
    bits, k, n, m = args.bits[0], args.k, args.n, args.m[0]
    g = {8: k, 4: 128, 16: 0}[bits]
    key = jax.random.key(0)
    q, s = qmm._random_weight(key, k, n, bits, g)
    x = jax.random.normal(key, (m, k), jnp.bfloat16)
    bs = VARIANTS[args.variant]
    f = jax.jit(functools.partial(_pallas, bits=bits, group_size=g, block_sizes=bs))
    with quiet():
        jax.block_until_ready(f(x, q, s))
    _profiler("cuProfilerStart")
    jax.block_until_ready(f(x, q, s))
    _profiler("cuProfilerStop")
    print(f"profiled int{bits} K={k} N={n} M={m} {args.variant}: {qmm._weight_bytes(q, s) / 1e6:.1f} MB")


def cmd_prefill(args) -> None:
    from jllm import bench
    from jllm.config import LlamaConfig
    from jllm.generate import bucket, prefill
    from jllm.model import init_cache
    from jllm.sampling import Sampling

    cfg = LlamaConfig.from_name(args.config)
    params = bench.random_params(cfg, args.config)
    T = bucket(args.prompt_len)
    tokens = jax.random.randint(jax.random.key(1), (1, T), 3, cfg.vocab_size, jnp.int32)
    n = jnp.full((1,), args.prompt_len, jnp.int32)
    sampling, key = Sampling.make(1), jax.random.key(0)

    def run():
        cache = init_cache(cfg, 1, bucket(T + 128), jnp.bfloat16)
        return prefill(params, tokens, n, cache, sampling, key, cfg=cfg, attn_impl=args.attn_impl,
                       matmul_impl="xla")
    with quiet():
        jax.block_until_ready(run())
        jax.block_until_ready(run())
    _profiler("cuProfilerStart")
    jax.block_until_ready(run())
    _profiler("cuProfilerStop")
    print(f"profiled prefill {args.config} T={T} attn={args.attn_impl}")


def cmd_bf16_e2e(args) -> None:
    """Llama-2-7B bf16 batch-1 decode with the Pallas bf16 GEMV (tiling `--variant`) vs XLA's."""
    from jllm import bench, quant
    from jllm.config import LlamaConfig
    cfg = LlamaConfig.from_name("llama-2-7b")
    params = bench.random_params(cfg, "llama-2-7b")
    if args.variant != "default":
        bs = VARIANTS[args.variant]
        qmm.default_block_sizes = lambda m, k, n, bits, _d=qmm.default_block_sizes: (
            bs if bits == 16 and m == 1 else _d(m, k, n, bits))
    rows = []
    for on in (False, True):
        quant.PALLAS_BF16_GEMV = on
        jax.clear_caches()
        r = bench.run(cfg, "llama-2-7b", params=params, warm_compile=False, bandwidth=3.13,
                      peak_tflops=790, new_tokens=128)
        rows.append(r)
        print(f"bf16 Pallas GEMV {on} ({args.variant}): {r.decode_tok_s_per_seq:.1f} tok/s, "
              f"TPOT {r.tpot_ms:.3f} ms", flush=True)
    print(bench.format_table(rows))


def cmd_ncu_summary(args) -> None:
    """Total time per kernel name from `ncu --csv --page raw --metrics gpu__time_duration.sum`."""
    import csv
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("what", choices=["gemv", "gemv-multi", "gemv-one", "gemv-check", "bf16-e2e",
                                     "prefill", "ncu-summary"])
    ap.add_argument("--file", help="ncu-summary: the ncu CSV")
    ap.add_argument("--bits", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--m", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=22016)
    ap.add_argument("--variant", default="default", choices=list(VARIANTS))
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS), help="gemv: only these")
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--attn-impl", default="pallas")
    args = ap.parse_args()
    if args.what == "ncu-summary":
        return cmd_ncu_summary(args)
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)
    {"gemv": cmd_gemv, "gemv-multi": cmd_gemv_multi, "gemv-one": cmd_gemv_one,
     "gemv-check": lambda a: qmm.check_all(), "bf16-e2e": cmd_bf16_e2e,
     "prefill": cmd_prefill}[args.what](args)


if __name__ == "__main__":
    main()
