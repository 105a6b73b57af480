"""How fast a Pallas-Triton kernel reads a weight-sized matrix, by access pattern.

    python -m scripts.gpu stream [--k 4096] [--n-bytes 45056]

A batch-1 GEMV is a read of its weight plus a little arithmetic. This part times the read alone:
each program sums int32 tiles of its share of a [K, N] matrix (one integer add per word), in an
on-device loop over several copies (more than the L2 holds). Two layouts of the same bytes:
- "rows": the matrix as it is stored, row-major [K, N]. A [bk, bn] tile is bk runs of bn words,
  each run one row's strip, rows N words apart (what quant_matmul reads today);
- "tiled": [N / bn, K, bn], each column block's rows contiguous, so a tile is one run of
  bk * bn words.
Per tile width, rows per tile, tiles in flight and programs, the figure is TB/s over the bytes
read. The peak to compare with is a plain XLA reduction over the same matrix, printed first.
"""
import argparse
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton
from scripts.gpu.common import header
from scripts.gpu.timing import loop_us

# (layout, words per run bn, rows per tile bk, tiles in flight, warps, K splits or None: from --programs)
CASES = [
    ("rows", 32, 64, 2, 4, None), ("rows", 64, 32, 2, 4, None), ("rows", 128, 16, 2, 4, None),
    ("rows", 256, 8, 2, 4, None), ("rows", 64, 64, 2, 4, None), ("rows", 64, 32, 3, 4, None),
    ("rows", 64, 32, 4, 4, None), ("rows", 128, 32, 3, 8, None),
    ("tiled", 32, 64, 2, 4, None), ("tiled", 64, 32, 2, 4, None), ("tiled", 128, 16, 2, 4, None),
    ("tiled", 64, 32, 3, 4, None), ("tiled", 64, 64, 2, 4, None), ("tiled", 128, 32, 3, 8, None),
]


def _kernel(w_ref, o_ref, *, tiled: bool, bk: int, bn: int, tiles: int, prefetch: int):
    pid_n, pid_s = pl.program_id(0), pl.program_id(1)
    t0 = pid_s * tiles

    def load(t):
        r0 = pl.multiple_of(t * bk, bk)
        ref = (w_ref.at[pid_n, pl.ds(r0, bk), :] if tiled
               else w_ref.at[pl.ds(r0, bk), pl.ds(pl.multiple_of(pid_n * bn, bn), bn)])
        return plgpu.load(ref, eviction_policy="evict_first")

    def body(i, carry):
        acc, buf = carry
        return acc + buf[0], (*buf[1:], load(t0 + i + prefetch - 1))

    buf = tuple(load(t0 + j) for j in range(prefetch - 1))
    acc, buf = lax.fori_loop(0, tiles - prefetch + 1, body, (jnp.zeros((bk, bn), jnp.int32), buf))
    for b in buf:
        acc = acc + b
    o_ref[pid_s, pl.ds(pl.multiple_of(pid_n * bn, bn), bn)] = acc.sum(axis=0)


def read_sum(w, *, tiled: bool, bk: int, bn: int, splits: int, prefetch: int, warps: int, interpret=False):
    """Column sums (int32, wrapping) of w, per K split: [splits, N]."""
    if tiled:
        nb, k, _ = w.shape
        n = nb * bn
    else:
        k, n = w.shape
        nb = n // bn
    tiles = k // bk // splits
    return pl.pallas_call(
        functools.partial(_kernel, tiled=tiled, bk=bk, bn=bn, tiles=tiles, prefetch=prefetch),
        grid=(nb, splits), out_shape=jax.ShapeDtypeStruct((splits, n), jnp.int32),
        compiler_params=_triton.compiler_params(warps, 1), interpret=interpret)(w)


def to_tiled(w, bn: int):
    k, n = w.shape
    return w.reshape(k, n // bn, bn).transpose(1, 0, 2)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu stream", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n-bytes", type=int, default=45056, help="bytes per row (gate/up bf16: 44032)")
    ap.add_argument("--copies", type=int, default=3)
    ap.add_argument("--programs", type=int, default=528, help="about this many programs per launch")
    args = ap.parse_args(argv)
    header()
    k, n = args.k, args.n_bytes // 4
    ws = [jax.random.randint(jax.random.key(i), (k, n), -1000, 1000, jnp.int32) for i in range(args.copies)]
    nbytes = k * n * 4
    ref = ws[0].sum(axis=0)
    iters = 10

    def loop(op, sets):
        @jax.jit
        def run(sets):
            def body(i, acc):
                return acc + sum(op(w).sum() for w in sets)
            return lax.fori_loop(0, iters, body, jnp.int32(0))
        return loop_us(lambda: run(sets), iters * len(sets))

    us = loop(lambda w: w.sum(axis=0), ws)
    print(f"XLA column sum: {us:7.1f} us {nbytes / us / 1e6:5.2f} TB/s ({nbytes / 1e6:.0f} MB)", flush=True)
    for layout, bn, bk, prefetch, warps, splits in CASES:
        tiled = layout == "tiled"
        if n % bn:
            continue
        splits = splits or max(1, min(args.programs // (n // bn), k // bk // 4))
        while (k // bk) % splits:
            splits -= 1
        sets = [to_tiled(w, bn) for w in ws] if tiled else ws
        jax.block_until_ready(sets)
        op = functools.partial(read_sum, tiled=tiled, bk=bk, bn=bn, splits=splits, prefetch=prefetch,
                               warps=warps)
        name = f"{layout:5s} run {bn * 4:5d} B tile {bk:3d}x{bn:3d} ({bk * bn * 4 // 1024:2d} KB) " \
               f"in flight {prefetch} warps {warps} programs {n // bn * splits:5d}"
        try:
            with _triton.quiet():
                ok = bool((op(sets[0]).sum(axis=0) == ref).all())
                us = loop(op, sets)
            print(f"{name}: {us:7.1f} us {nbytes / us / 1e6:5.2f} TB/s{'' if ok else '  WRONG SUM'}", flush=True)
        except Exception as e:  # a case that fails to compile is reported, the rest go on
            print(f"{name}: FAILED {type(e).__name__}: {str(e)[:200]}", flush=True)
        del sets
