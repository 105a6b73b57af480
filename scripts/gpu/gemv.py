"""The weight-only quantized matmul (pallas_kernels.quant_matmul) on the GPU.

    python -m scripts.gpu quant-matmul [--m 1 8 64] [--sweep VARIANT ...]
    python -m scripts.gpu gemv [--bits 8 4] [--m 1 8] [--variants VARIANT ...]
    python -m scripts.gpu gemv-multi [--bits 8 4 16] [--m 1 8]
    python -m scripts.gpu bf16-e2e [--variant VARIANT]
    python -m scripts.gpu int4-prefill [--m 128 512 2048] [--bench 128 2048]

`quant-matmul` times each op per call over rotated weight sets (`timing.time_us`, host dispatch
overlapped): one Llama-2-7B layer's four shapes at batch 1, 8 and 64, XLA against the kernel.
`gemv` and `gemv-multi` time each op inside one jitted loop over the weight sets (`timing.loop_time_us`),
so the figure is kernel time plus the launch gap between kernels, as in a decode step. Every
kernel variant is checked against `quant_matmul_ref` before it is timed.
"""
import functools
import math

import jax
import jax.numpy as jnp

from pallas_kernels import _triton
from pallas_kernels import quant_matmul as qmm
from scripts.gpu.common import PEAK_TBS, header, rel_err
from scripts.gpu.timing import loop_time_us, time_us

SHAPES = ((4096, 12288), (4096, 4096), (4096, 22016), (11008, 4096))  # K x N, one Llama-2-7B layer
# int4 with group scales, folded step, read as words: 64 packed rows x 128 columns, 2 in flight
_W4 = functools.partial(qmm.BlockSizes, block_n=128, block_k=128, prefetch=2, fold=True, words=True)
# int8 per channel read as words: 32 rows x 256 columns, 2 in flight
_W8 = functools.partial(qmm.BlockSizes, block_n=256, block_k=32, prefetch=2, words=True)
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
    "int4-unfolded": qmm.BlockSizes(block_n=128, block_k=128, prefetch=2),
    "int4-fold-w8": qmm.BlockSizes(block_n=128, block_k=128, prefetch=2, fold=True, num_warps=8,
                                   target_programs=1056),
    "int4-fold-k64p3": qmm.BlockSizes(block_n=128, block_k=64, prefetch=3, fold=True),
    "int4-fold-n256": qmm.BlockSizes(block_n=256, block_k=128, prefetch=2, fold=True, num_warps=8),
    "n64k32p3": qmm.BlockSizes(block_n=64, block_k=32, prefetch=3),
    "n128k16p3": qmm.BlockSizes(block_n=128, block_k=16, prefetch=3),
    "n64k64p2w2": qmm.BlockSizes(block_n=64, block_k=64, prefetch=2, num_warps=2),
    # tilings of the 2026-12-04 third-round sweep (sized for the int8/int4 word-path trial, which
    # was not kept; they now tile the byte path), with grids sized to programs per SM
    "n512k16p2": qmm.BlockSizes(block_n=512, block_k=16, prefetch=2),
    "n256k32p2t660": qmm.BlockSizes(block_n=256, block_k=32, prefetch=2, target_programs=660),
    "n256k32p3t660": qmm.BlockSizes(block_n=256, block_k=32, prefetch=3, target_programs=660),
    "n256k16p2t1056": qmm.BlockSizes(block_n=256, block_k=16, prefetch=2, target_programs=1056),
    "n256k16p3t1056": qmm.BlockSizes(block_n=256, block_k=16, prefetch=3, target_programs=1056),
    "int4-fold-t396": qmm.BlockSizes(block_n=128, block_k=128, prefetch=2, fold=True,
                                     target_programs=396),
    "int4-fold-n256k64t396": qmm.BlockSizes(block_n=256, block_k=64, prefetch=2, fold=True,
                                            target_programs=396),
    "int4-fold-n512k32t396": qmm.BlockSizes(block_n=512, block_k=32, prefetch=2, fold=True,
                                            target_programs=396),
    "int4-fold-n256k32t528": qmm.BlockSizes(block_n=256, block_k=32, prefetch=3, fold=True),
    "n512k32w8t264": qmm.BlockSizes(block_n=512, block_k=32, prefetch=2, num_warps=8,
                                    target_programs=264),
    "n256k64w8t264": qmm.BlockSizes(block_n=256, block_k=64, prefetch=2, num_warps=8,
                                    target_programs=264),
    "n256k32p3": qmm.BlockSizes(block_n=256, block_k=32, prefetch=3),
    "n256k32p3t264": qmm.BlockSizes(block_n=256, block_k=32, prefetch=3, target_programs=264),
    "n512k16p3": qmm.BlockSizes(block_n=512, block_k=16, prefetch=3),
    "int4-fold-n256k128w8t132": qmm.BlockSizes(block_n=256, block_k=128, prefetch=2, fold=True,
                                               num_warps=8, target_programs=132),
    "int4-fold-n512k64w8t132": qmm.BlockSizes(block_n=512, block_k=64, prefetch=2, fold=True,
                                              num_warps=8, target_programs=132),
    "int4-fold-n512k32t264": qmm.BlockSizes(block_n=512, block_k=32, prefetch=2, fold=True,
                                            target_programs=264),
    # int4 read as int32 words of 4 columns, a folded PTX step per column (BlockSizes.words)
    "int4-fold": qmm.BlockSizes(block_n=128, block_k=128, prefetch=2, fold=True),
    "int4-words": _W4(),
    "int4-words-t396": _W4(target_programs=396),
    "int4-words-n512k32": _W4(block_n=512, block_k=32),
    "int4-words-n512k32t396": _W4(block_n=512, block_k=32, target_programs=396),
    "int4-words-n256k128w8": _W4(block_n=256, num_warps=8),
    "int4-words-n128k64t792": _W4(block_k=64, target_programs=792),
    "int4-words-n256k64": _W4(block_n=256, block_k=64),
    "int4-words-n256k128t264": _W4(block_n=256, target_programs=264),
    # words in sub-tiles: one accumulator per column for the same element of each sub-tile
    "int4-w-s4-t660": _W4(sub_tiles=4, target_programs=660),
    "int4-w-s4-t528": _W4(sub_tiles=4),
    "int4-w-s4-p3": _W4(prefetch=3, sub_tiles=4),
    "int4-w-s4-p3-t396": _W4(prefetch=3, sub_tiles=4, target_programs=396),
    "int4-w-s2": _W4(sub_tiles=2),
    "int4-w-s4-n256t396": _W4(block_n=256, sub_tiles=4, target_programs=396),
    # int4 by integer dot products on int8 limbs of x (BlockSizes.idp4a; the default at M = 1)
    "int4-idp4a": _W4(words=False, idp4a=True),
    "int4-idp4a-p3t396": _W4(words=False, idp4a=True, prefetch=3, target_programs=396),
    "int4-idp4a-t396": _W4(words=False, idp4a=True, target_programs=396),
    "int4-idp4a-t792": _W4(words=False, idp4a=True, target_programs=792),
    "int4-idp4a-p3t660": _W4(words=False, idp4a=True, prefetch=3, target_programs=660),
    "int4-idp4a-k64t792": _W4(words=False, idp4a=True, block_k=64, prefetch=3, target_programs=792),
    # int8 (per channel) read as int32 words of 4 columns (BlockSizes.words), in sub-tiles
    "int8-words-t660": _W8(target_programs=660),
    "int8-words-p3": _W8(prefetch=3),
    "int8-words-n128k64": _W8(block_n=128, block_k=64),
    "int8-words-n128k32t1056": _W8(block_n=128, target_programs=1056),
    "int8-w-s4-t1056": _W8(sub_tiles=4, target_programs=1056),
    "int8-w-s4-p3-t924": _W8(prefetch=3, sub_tiles=4, target_programs=924),
    "int8-w-s4-k64-t660": _W8(block_k=64, sub_tiles=4, target_programs=660),
    "int8-w-s4-t528": _W8(sub_tiles=4),
    "int8-w-s2-p3-t660": _W8(prefetch=3, sub_tiles=2, target_programs=660),
    # int4 as a tensor-core dot of the transposed tile on PTX-made bf16 codes (docs/perf_quant.md,
    # instruction counts): no prefetch (fewest instructions), 8 warps, register prefetch, cp.async
    "int4-mma": qmm.BlockSizes(block_n=128, block_k=128, prefetch=1, num_stages=1, mma=True),
    "int4-mma-n256w8": qmm.BlockSizes(block_n=256, block_k=128, prefetch=1, num_stages=1,
                                      num_warps=8, mma=True),
    "int4-mma-t1056": qmm.BlockSizes(block_n=128, block_k=128, prefetch=1, num_stages=1,
                                     target_programs=1056, mma=True),
    "int4-mma-p2": qmm.BlockSizes(block_n=128, block_k=128, prefetch=2, num_stages=1, mma=True),
    "int4-mma-s3": qmm.BlockSizes(block_n=128, block_k=128, prefetch=1, num_stages=3, mma=True),
    # the dot path at M = 1 (x padded to 16 rows): the weight tiles reach shared memory by
    # cp.async, `num_stages` deep (Triton pipelines loads that feed a dot), instead of register
    # prefetch. bf16: ~1.5 instructions per weight in the loop against ~3.5 for the word FMA path.
    **{f"dot-n{n}k{k}s{st}{f'w{w}' if w != 4 else ''}t{t}": qmm.BlockSizes(
        block_n=n, block_k=k, block_m=16, fma=False, prefetch=1, num_stages=st, num_warps=w,
        tf32_dot=False, target_programs=t)
       for n, k, st, w, t in ((128, 128, 4, 4, 528), (128, 128, 4, 4, 264), (128, 64, 5, 4, 396),
                              (128, 64, 4, 4, 528), (256, 64, 4, 4, 264), (64, 128, 4, 4, 396),
                              (128, 128, 3, 8, 264), (256, 128, 3, 8, 132), (128, 256, 3, 8, 132),
                              (64, 256, 4, 4, 264))},
}
# Weights that read the same x, per shard: name -> (K, N of each weight).
MULTI_SHAPES = {
    "7b q/k/v": (4096, (4096, 4096, 4096)),
    "7b gate/up": (4096, (11008, 11008)),
    "70b-tp2 q/k/v": (8192, (4096, 512, 512)),
    "70b-tp2 gate/up": (8192, (14336, 14336)),
}


def group_size_for(bits: int, k: int) -> int:
    """The layouts timed here: int8 per output channel, int4 in groups of 128, bf16 unscaled."""
    return {8: k, 4: 128, 16: 0}[bits]


def random_weight(key, k: int, n: int, bits: int, group_size: int):
    """Random (q, scale) [K, N]: codes over the full range, scales near 1/qmax; bf16 for bits=16."""
    kq, ks = jax.random.split(key)
    if bits == 16:
        return jax.random.normal(kq, (k, n), jnp.bfloat16) * 0.02, None
    lim = 8 if bits == 4 else 128
    q = jax.random.randint(kq, (k, n), -lim + 1, lim, jnp.int8)
    if bits == 4:
        q = qmm.pack_int4(q, group_size)
    scale = jax.random.uniform(ks, (k // group_size, n), jnp.float32, 0.5, 1.5) / lim
    return q, scale.astype(jnp.bfloat16)


def weight_bytes(q, scale) -> int:
    return q.size * q.dtype.itemsize + (0 if scale is None else scale.size * scale.dtype.itemsize)


def weight_groups(key, k: int, ns, bits: int, group_size: int, min_bytes: float = 160e6) -> list[tuple]:
    """Sets of one random (q, scale) [K, N] per N in ns; enough sets that one pass reads >= 3x L2."""
    def group(kk):
        return tuple(random_weight(jax.random.fold_in(kk, i), k, n, bits, group_size) for i, n in enumerate(ns))
    first = group(key)
    count = max(2, min(32, math.ceil(min_bytes / sum(weight_bytes(*w) for w in first))))
    return [first] + [group(kk) for kk in jax.random.split(key, count)[1:]]


def weight_sets(key, k: int, n: int, bits: int, group_size: int) -> list[tuple]:
    return [w for (w,) in weight_groups(key, k, (n,), bits, group_size)]


def check(x, weights, bits: int, group_size: int, block_sizes=None) -> float:
    """quant_matmul (one weight) or quant_matmul_multi (several) against the ref: the largest
    relative error; raises past 2e-2 or on a NaN."""
    with _triton.quiet():
        if len(weights) == 1:
            ys = (qmm.quant_matmul(x, *weights[0], bits=bits, group_size=group_size, block_sizes=block_sizes),)
        else:
            ys = qmm.quant_matmul_multi(x, weights, bits=bits, group_size=group_size, block_sizes=block_sizes)
    refs = qmm.quant_matmul_multi_ref(x, weights, bits=bits, group_size=group_size)
    errs = [rel_err(y, ref) for y, ref in zip(ys, refs)]
    if not all(e < 2e-2 for e in errs) or any(bool(jnp.isnan(y).any()) for y in ys):
        raise AssertionError(f"kernel mismatch {x.shape=} {[q.shape for q, _ in weights]} {bits=} "
                             f"{group_size=}: rel errs {errs}")
    return max(errs)


def _xla_bf16(x, w, s):
    return x @ w


def _xla_int8(x, q, s):
    return (x @ q.astype(x.dtype)) * s


def _pallas(x, q, s, *, bits, group_size, block_sizes=None):
    return qmm.quant_matmul(x, q, s, bits=bits, group_size=group_size, block_sizes=block_sizes)


def _per_call_us(op, x, weights, trials: int = 15, reps: int = 5) -> float:
    with _triton.quiet():
        return time_us(op, [(x, q, s) for q, s in weights], trials=trials, reps=reps)


def sweep(names: list[str], batches=(1, 8), bits_list=(8, 4)) -> None:
    """us and TB/s for each named variant over SHAPES x batches x bits (tuning aid)."""
    key = jax.random.key(1)
    for bits in bits_list:
        for k, n in SHAPES:
            g = group_size_for(bits, k)
            ws = weight_sets(key, k, n, bits, g)
            nbytes = weight_bytes(*ws[0])
            for m in batches:
                x = jax.random.normal(key, (m, k), jnp.bfloat16)
                row = []
                if bits != 4:
                    us = _per_call_us(_xla_int8 if bits == 8 else _xla_bf16, x, ws, trials=7, reps=3)
                    row.append(f"xla={us:.1f}us/{nbytes / us / 1e6:.2f}")
                for name in names:
                    try:
                        check(x, ws[:1], bits, g, VARIANTS[name])
                        op = functools.partial(_pallas, bits=bits, group_size=g, block_sizes=VARIANTS[name])
                        us = _per_call_us(op, x, ws, trials=7, reps=3)
                        row.append(f"{name}={us:.1f}us/{nbytes / us / 1e6:.2f}")
                    except Exception as e:  # a variant that fails to compile is reported, not fatal
                        row.append(f"{name}=ERR({type(e).__name__}: {str(e)[:200]})")
                print(f"sweep int{bits} K={k} N={n} M={m}: " + "  ".join(row), flush=True)


def quant_matmul(args) -> None:
    """Per shape, then per layer: XLA bf16, XLA int8, Pallas int8/int4/bf16, µs and TB/s."""
    header()
    if args.sweep:
        sweep(args.sweep)
    key = jax.random.key(0)
    rows = []
    for k, n in SHAPES:
        w16, w8, w4 = (weight_sets(key, k, n, 16, 0), weight_sets(key, k, n, 8, k), weight_sets(key, k, n, 4, 128))
        methods = {"bf16 xla": (w16, _xla_bf16, 16),
                   "int8 xla": (w8, _xla_int8, 8),
                   "int8 pallas": (w8, functools.partial(_pallas, bits=8, group_size=k), 8),
                   "int4 pallas": (w4, functools.partial(_pallas, bits=4, group_size=128), 4),
                   "bf16 pallas": (w16, functools.partial(_pallas, bits=16, group_size=0), 16)}
        for m in args.m:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            for name, (ws, op, bits) in methods.items():
                if name == "bf16 pallas" and m > 8:
                    continue
                if "pallas" in name:
                    check(x, ws[:1], bits, group_size_for(bits, k))
                nbytes = weight_bytes(*ws[0])
                us = _per_call_us(op, x, ws)
                tbs = nbytes / us / 1e6
                rows.append((k, n, m, name, us, tbs))
                print(f"K={k:6d} N={n:6d} M={m:3d} {name:12s} {us:8.1f} us {tbs:5.2f} TB/s "
                      f"({100 * tbs / PEAK_TBS:3.0f}% of {PEAK_TBS})", flush=True)
    print("\nper layer (sum of the four shapes), us and TB/s over bytes read:")
    for m in args.m:
        for name in ("bf16 xla", "int8 xla", "int8 pallas", "int4 pallas", "bf16 pallas"):
            sel = [r for r in rows if r[2] == m and r[3] == name]
            if len(sel) == len(SHAPES):
                us = sum(r[4] for r in sel)
                tb = sum(r[4] * r[5] for r in sel) / us
                print(f"M={m:3d} {name:12s} {us:8.1f} us/layer {tb:5.2f} TB/s ({100 * tb / PEAK_TBS:3.0f}%)")


def loop_time(op, x, weights, iters: int = 20) -> float:
    """Microseconds per op: one jitted loop applies op(x, *w) to every weight set w, `iters` times
    (w is (q, scale), or for gemv-multi a tuple of them; timing.loop_time_us)."""
    with _triton.quiet():
        return loop_time_us(op, [(x, *w) for w in weights], iters)


def gemv(args) -> None:
    """Each variant per shape in a loop, then per layer: µs and TB/s."""
    header()
    key = jax.random.key(0)
    rows = []
    for bits in args.bits:
        for k, n in SHAPES:
            g = group_size_for(bits, k)
            ws = weight_sets(key, k, n, bits, g)
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
                    # at M > 1 only the default, unless variants are named
                    if (m > 1 and name != "default" and not args.variants) or (
                            args.variants and name not in args.variants):
                        continue
                    ops[name] = (functools.partial(_pallas, bits=bits, group_size=g, block_sizes=bs), ws)
                for name, (op, w) in ops.items():
                    try:
                        if name not in ("xla-bf16", "xla-int8"):
                            check(x, w[:1], bits, g, VARIANTS[name])
                        us = loop_time(op, x, w)
                        line = (bits, k, n, m, name, us, weight_bytes(*w[0]) / us / 1e6)
                    except Exception as e:  # a variant that fails is reported, not fatal
                        print(f"int{bits} K={k} N={n} M={m} {name}: ERROR {type(e).__name__}: "
                              f"{str(e)[:300]}", flush=True)
                        continue
                    rows.append(line)
                    print(f"int{bits} K={k:5d} N={n:5d} M={m:2d} {name:15s} {us:7.1f} us "
                          f"{line[6]:5.2f} TB/s", flush=True)
            del ws, w16
    print("\nper layer (four shapes), us and TB/s:")
    for bits in args.bits:
        for m in args.m:
            for name in ["xla-bf16", "xla-int8", *VARIANTS]:
                sel = [r for r in rows if r[0] == bits and r[3] == m and r[4] == name]
                if len(sel) == len(SHAPES):
                    us = sum(r[5] for r in sel)
                    tb = sum(r[5] * r[6] for r in sel) / us
                    print(f"int{bits} M={m:2d} {name:15s} {us:7.1f} us/layer {tb:5.2f} TB/s "
                          f"({100 * tb / PEAK_TBS:3.0f}%)")


def _separate(x, *ws, bits, group_size):
    return tuple(_pallas(x, q, s, bits=bits, group_size=group_size) for q, s in ws)


def _multi(x, *ws, bits, group_size):
    return qmm.quant_matmul_multi(x, ws, bits=bits, group_size=group_size)


def _xla_separate(x, *ws, bits, group_size):
    """bf16 weights through XLA, one dot each: what the model does without pallas-fused."""
    del bits, group_size
    return tuple(x @ w for w, _ in ws)


def gemv_multi(args) -> None:
    """Weights sharing x (q/k/v, gate/up): one quant_matmul per weight vs one quant_matmul_multi."""
    header()
    key = jax.random.key(0)
    for bits in args.bits:
        for name, (k, ns) in MULTI_SHAPES.items():
            g = group_size_for(bits, k)
            groups = weight_groups(key, k, ns, bits, g)
            nbytes = sum(weight_bytes(*w) for w in groups[0])
            for m in args.m:
                x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
                err = check(x, groups[0], bits, g)
                print(f"int{bits} {name} K={k} N={'+'.join(map(str, ns))} M={m}: multi rel err {err:.1e}", flush=True)
                times = {}
                ops = (("separate", _separate), ("multi", _multi))
                if bits == 16:
                    ops += (("xla", _xla_separate),)
                for op_name, op in ops:
                    op = functools.partial(op, bits=bits, group_size=g)
                    times[op_name] = us = loop_time(op, x, groups)
                    print(f"int{bits} {name:16s} M={m} {op_name:8s} {us:7.1f} us {nbytes / us / 1e6:5.2f} TB/s",
                          flush=True)
                print(f"int{bits} {name:16s} M={m} multi/separate {times['multi'] / times['separate']:.3f}"
                      + (f", multi/xla {times['multi'] / times['xla']:.3f}" if "xla" in times else ""),
                      flush=True)
            del groups


def bf16_e2e(args) -> None:
    """Llama-2-7B bf16 decode (batch `--batch`, default 1) through XLA's GEMMs and through the
    kernel's bits=16 path (matmul_impl pallas-fused) with each tiling of `--variants` (default:
    the tree's); with --single, o and down go through the kernel too (quant.PALLAS_FLOAT_SINGLE)."""
    from jllm import bench, parallel, quant
    from jllm.config import LlamaConfig

    header()
    cfg = LlamaConfig.from_name("llama-2-7b")
    params = parallel.random_params(cfg, None, jax.random.key(0))
    saved = qmm.default_block_sizes, quant.MAX_PALLAS_M_FLOAT, quant.PALLAS_FLOAT_SINGLE
    default = saved[0]
    runs = [("xla", "default", False)] + [("pallas-fused", v, single) for v in args.variants
                                         for single in ((False, True) if args.single else (False,))]
    rows = []
    try:
        quant.MAX_PALLAS_M_FLOAT = max(quant.MAX_PALLAS_M_FLOAT, args.batch)
        for impl, variant, single in runs:
            bs = VARIANTS[variant]  # this process only: the variant replaces the float GEMV's default
            qmm.default_block_sizes = (default if bs is None else (
                lambda m, k, n, bits, bs=bs: bs if bits == 16 and m <= args.batch else default(m, k, n, bits)))
            quant.PALLAS_FLOAT_SINGLE = single
            jax.clear_caches()  # the globals above change what the jitted step traces to
            r = bench.run(cfg, "llama-2-7b", params=params, warm_compile=False, matmul_impl=impl,
                          new_tokens=128, batch=args.batch)
            rows.append(r)
            print(f"bf16 batch {args.batch} {impl} {variant}{' +o/down' if single else ''}: "
                  f"{r.decode_tok_s_per_seq:.1f} tok/s per sequence, TPOT {r.tpot_ms:.3f} ms", flush=True)
    finally:  # the knobs as they were, also when a run fails
        qmm.default_block_sizes, quant.MAX_PALLAS_M_FLOAT, quant.PALLAS_FLOAT_SINGLE = saved
    print(bench.format_table(rows))


# int4 prefill tilings: the tensor-core dot of 128-row tiles (the default past M = 64) and the
# transposed dot with the weight as the register operand (BlockSizes.mma).
PREFILL_VARIANTS = {
    "dot": None,
    "mma": qmm.BlockSizes(block_m=128, block_n=128, block_k=128, mma=True, fma=False, prefetch=1,
                          num_warps=8, num_stages=3, tf32_dot=False),
}


def int4_prefill(args) -> None:
    """int4 (groups of 128) at prefill sizes: one 7B layer per M through XLA's formulation
    (`jllm.quant._xla_qmatmul`, what the model runs past quant.MAX_PALLAS_M_GROUPED), the
    kernel's tilings, and XLA's bf16 GEMM for scale; µs per layer and TFLOP/s. With --bench, then
    `jllm bench` TTFT with int4 weights, the prefill through XLA and through each tiling. A tiling
    or bench path that fails is reported and the rest still run; the run then ends in a
    RuntimeError naming what failed."""
    from jllm import quant

    header()
    key = jax.random.key(0)
    rows, failed = {}, []
    for k, n in SHAPES:
        w4, w16 = weight_sets(key, k, n, 4, 128), weight_sets(key, k, n, 16, 0)
        for m in args.m:
            x = jax.random.normal(jax.random.fold_in(key, m), (m, k), jnp.bfloat16)
            ops = {"xla int4": (w4, lambda x, q, s: quant._xla_qmatmul(x, quant.QArray(q, s, 4, 128)).astype(x.dtype)),
                   "xla bf16": (w16, _xla_bf16)}
            for name, bs in PREFILL_VARIANTS.items():
                ops[name] = (w4, functools.partial(_pallas, bits=4, group_size=128, block_sizes=bs))
            for name, (ws, op) in ops.items():
                label = f"K={k:6d} N={n:6d} M={m:5d} {name:9s}"
                try:  # a tiling that fails to compile or to match is reported, and the rest go on
                    if name in PREFILL_VARIANTS:
                        check(x, ws[:1], 4, 128, PREFILL_VARIANTS[name])
                    us = _per_call_us(op, x, ws, trials=7, reps=3)
                except Exception as e:
                    print(f"{label} FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
                    failed.append(f"{name} at K={k} N={n} M={m}")
                    continue
                rows.setdefault((m, name), []).append(us)
                print(f"{label} {us:9.1f} us {2 * m * k * n / us / 1e6:6.1f} TFLOP/s", flush=True)
    flops = {m: sum(2 * m * k * n for k, n in SHAPES) for m in args.m}
    print("\nint4 prefill GEMMs, one 7B layer (four shapes):")
    for (m, name), v in rows.items():
        if len(v) == len(SHAPES):
            print(f"M={m:5d} {name:9s} {sum(v):9.1f} us/layer {flops[m] / sum(v) / 1e6:6.1f} TFLOP/s")
    if args.bench:
        failed += _int4_prefill_bench(args.bench)
    if failed:
        raise RuntimeError(f"int4-prefill: {len(failed)} failed: {'; '.join(failed)}")


def _int4_prefill_bench(prompt_lens, config: str = "llama-2-7b", extra: tuple = ()) -> list[str]:
    """`jllm bench` TTFT, int4 weights, with the prefill's GEMMs through XLA and each tiling
    (`extra`: more bench options). A path whose bench fails is reported and the next one runs;
    returns the failed paths."""
    from jllm import cli, quant

    default_max, default_bs = quant.MAX_PALLAS_M_GROUPED, qmm.default_block_sizes
    failed = []
    for name, bs in {"xla": None, **PREFILL_VARIANTS}.items():
        quant.MAX_PALLAS_M_GROUPED = default_max if name == "xla" else 1 << 20
        qmm.default_block_sizes = (default_bs if bs is None else
                                   lambda m, k, n, bits, bs=bs: bs if m > 64 else default_bs(m, k, n, bits))
        jax.clear_caches()
        print(f"== int4 prefill through {name}", flush=True)
        try:
            rc = cli.main(["bench", "--config", config, "--quantize", "int4", "--batch", "1", "--new-tokens", "16",
                           "--no-warm-compile", *extra, "--prompt-len", *map(str, prompt_lens)])
            error = f"jllm bench exited with {rc}" if rc else None
        except Exception as e:
            error = f"{type(e).__name__}: {str(e)[:300]}"
        finally:
            quant.MAX_PALLAS_M_GROUPED, qmm.default_block_sizes = default_max, default_bs
        if error:
            print(f"== int4 prefill through {name}: FAILED {error}", flush=True)
            failed.append(f"bench through {name}")
    return failed
