"""Do Hopper's bulk tensor copies (TMA, through Pallas' Mosaic GPU back end) read a decode step's
weights faster than our Pallas-Triton kernels?

    python -m scripts.gpu tma [--parts stream gemv]

Every GEMV of jllm runs on Pallas-Triton, whose loads go through registers (or cp.async for a
dot's operands). Those kernels and XLA's cuBLAS GEMV read 2.9-3.4 TB/s per 7B layer on an H200,
against 4.39 TB/s for `jllm bench`'s flat 2 GiB sum. This part measures the alternative before
anything is built on it:

- `stream`: a Mosaic GPU kernel whose only work is a TMA pipeline over [K, N] bf16 tiles
  (`emit_pipeline`, `stages` copies in flight, an empty body): the copy engine's read rate, per
  tile shape, pipeline depth and grid.
- `gemv`: a bf16 GEMV on that pipeline. x is padded to the 64 rows of a wgmma, each program
  multiplies its K split of one column block (acc [64, tile_n] float32, weight tile from shared
  memory) and writes float32 partials that XLA sums. Checked against x @ w, then timed on one
  Llama-2-7B layer's four shapes against the tree's bits=16 kernel and XLA's dot, in the same
  on-device loop as `scripts.gpu gemv`. Then the same for per-channel int8 weights, whose tile
  becomes bf16 in registers and goes back to shared memory for the wgmma, against the tree's
  int8 kernel.

A variant that fails to lower or compile is reported and the rest still run.
"""
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels import _triton
from pallas_kernels import quant_matmul as qmm
from scripts.gpu.common import header, rel_err
from scripts.gpu.gemv import SHAPES, weight_sets
from scripts.gpu.timing import loop_time_us

ROWS = 64  # a wgmma's M


def _plmgpu():
    from jax.experimental.pallas import mosaic_gpu as plmgpu  # imported here: GPU-only back end
    return plmgpu


def _transforms(cols: int, itemsize: int):
    """Shared-memory tiling and swizzle for rows of `cols` elements (what TMA and wgmma expect)."""
    plmgpu = _plmgpu()
    sw = plmgpu.find_swizzle(cols * itemsize * 8)
    return (plmgpu.TilingTransform((8, sw // itemsize)), plmgpu.SwizzleTransform(sw))


def _splits(k_steps: int, blocks: int, programs: int) -> int:
    """The most K splits (dividing k_steps) that keep blocks * splits <= programs (at least 1)."""
    best = 1
    for s in range(1, k_steps + 1):
        if k_steps % s == 0 and blocks * s <= programs:
            best = s
    return best


def _params(interpret):
    return {} if interpret is None else {"interpret": interpret}


def tma_stream(token, w, *, tile_k: int, tile_n: int, stages: int, programs: int, interpret=None):
    """Read w [K, N] once through a TMA pipeline with an empty body; token (unused by the kernel)
    keeps the call inside a timing loop. Returns a [1] float32 nobody reads."""
    plmgpu = _plmgpu()
    k, n = w.shape
    blocks = n // tile_n
    splits = _splits(k // tile_k, blocks, programs)
    steps = k // tile_k // splits

    def body(t_gmem, w_gmem, o_gmem):
        del t_gmem, o_gmem
        ni, si = lax.axis_index("n"), lax.axis_index("s")
        part = w_gmem.at[pl.ds(si * (steps * tile_k), steps * tile_k), pl.ds(ni * tile_n, tile_n)]
        plmgpu.emit_pipeline(
            lambda idx, w_smem: None, grid=(steps,),
            in_specs=[plmgpu.BlockSpec((tile_k, tile_n), lambda kk: (kk, 0),
                                       transforms=_transforms(tile_n, w.dtype.itemsize))],
            max_concurrent_steps=stages)(part)

    return plmgpu.kernel(body, out_type=jax.ShapeDtypeStruct((1,), jnp.float32), grid=(blocks, splits),
                         grid_names=("n", "s"), **_params(interpret))(token, w)


def gemv_wgmma(x, w, scale=None, *, tile_k: int, tile_n: int, stages: int, programs: int,
               interpret=None):
    """x [M <= 64, K] @ w [K, N] -> [M, N] in x's dtype: TMA pipeline + wgmma, K split over
    programs, float32 partials summed by XLA. w is bf16, or int8 codes with a per-channel `scale`
    [1, N]: each int8 tile becomes bf16 in registers (exact) and goes back to shared memory in the
    wgmma's layout; the scale multiplies the summed partials."""
    plmgpu = _plmgpu()
    m, k = x.shape
    n = w.shape[1]
    if m > ROWS or k % tile_k or n % tile_n:
        raise ValueError(f"{x.shape=} {w.shape=} do not tile by ({tile_k}, {tile_n}) with M <= {ROWS}")
    codes = w.dtype == jnp.int8
    blocks = n // tile_n
    splits = _splits(k // tile_k, blocks, programs)
    steps = k // tile_k // splits
    x64 = jnp.zeros((ROWS, k), jnp.bfloat16).at[:m].set(x.astype(jnp.bfloat16))

    def body(x_gmem, w_gmem, o_gmem, o_smem, *wb):
        ni, si = lax.axis_index("n"), lax.axis_index("s")
        ks = pl.ds(si * (steps * tile_k), steps * tile_k)

        def scope(acc_ref):
            def step(idx, x_smem, w_smem):
                if codes:
                    wb[0][...] = w_smem[...].astype(jnp.bfloat16)
                    plmgpu.commit_smem()
                plmgpu.wgmma(acc_ref, x_smem, wb[0] if codes else w_smem)
                plmgpu.wgmma_wait(0)

            plmgpu.emit_pipeline(step, grid=(steps,), in_specs=[
                plmgpu.BlockSpec((ROWS, tile_k), lambda kk: (0, kk), transforms=_transforms(tile_k, 2)),
                plmgpu.BlockSpec((tile_k, tile_n), lambda kk: (kk, 0),
                                 transforms=_transforms(tile_n, w.dtype.itemsize))],
                max_concurrent_steps=stages)(x_gmem.at[:, ks], w_gmem.at[ks, pl.ds(ni * tile_n, tile_n)])
            o_smem[...] = acc_ref[...]

        pl.run_scoped(scope, plmgpu.ACC((ROWS, tile_n), jnp.float32))
        plmgpu.commit_smem()
        plmgpu.copy_smem_to_gmem(o_smem, o_gmem.at[si, :, pl.ds(ni * tile_n, tile_n)])
        plmgpu.wait_smem_to_gmem(0)

    scratch = [plmgpu.SMEM((ROWS, tile_n), jnp.float32, transforms=_transforms(tile_n, 4))]
    if codes:
        scratch.append(plmgpu.SMEM((tile_k, tile_n), jnp.bfloat16, transforms=_transforms(tile_n, 2)))
    parts = plmgpu.kernel(
        body, out_type=jax.ShapeDtypeStruct((splits, ROWS, n), jnp.float32), grid=(blocks, splits),
        grid_names=("n", "s"), scratch_types=scratch, **_params(interpret))(x64, w)
    y = parts.sum(axis=0)[:m]
    return (y if scale is None else y * scale.astype(jnp.float32)).astype(x.dtype)


# (tile_k, tile_n, stages, programs)
STREAM_CASES = [(64, 128, 4, 264), (64, 128, 8, 264), (128, 128, 4, 264), (64, 256, 4, 264),
                (128, 256, 3, 132), (64, 64, 8, 528), (128, 64, 4, 528), (64, 128, 4, 528)]
GEMV_CASES = [(64, 128, 4, 132), (64, 128, 4, 264), (64, 64, 4, 264), (64, 64, 6, 264), (128, 64, 3, 264)]
INT8_CASES = [(64, 128, 4, 264), (128, 128, 4, 264), (64, 64, 6, 264)]


def _layer(label: str, fn, x, sets_per_shape) -> float | None:
    """µs per 7B layer (the four shapes) of fn(x, *w) in the on-device loop, or None if it fails;
    each w is (bf16 weight,) or (int8 codes, scale)."""
    total, nbytes = 0.0, 0
    for (k, n), sets in zip(SHAPES, sets_per_shape):
        xk, w = x[:, :k], sets[0]
        size = sum(a.size * a.dtype.itemsize for a in w)
        try:
            dense = w[0].astype(jnp.float32) * (w[1].astype(jnp.float32) if len(w) > 1 else 1.0)
            err = rel_err(fn(xk, *w), xk.astype(jnp.float32) @ dense)
            if not err < 2e-2:
                raise AssertionError(f"rel err {err:.2e}")
            with _triton.quiet():
                us = loop_time_us(fn, [(xk, *ws) for ws in sets])
        except Exception as e:  # reported, the rest go on
            print(f"{label} K={k} N={n}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
            return None
        total += us
        nbytes += size
        print(f"{label} K={k:5d} N={n:5d}: {us:7.1f} us {size / us / 1e6:5.2f} TB/s", flush=True)
    print(f"{label}: {total:7.1f} us/layer {nbytes / total / 1e6:5.2f} TB/s", flush=True)
    return total


def main(args) -> None:
    header()
    key = jax.random.key(0)
    sets = [[(w,) for w, _ in weight_sets(key, k, n, 16, 0)] for k, n in SHAPES]
    results = []
    if "stream" in args.parts:
        k, n = 4096, 22016
        big = [w for (w,) in sets[2]]
        token = jnp.zeros((8,), jnp.float32)
        for tk, tn, st, progs in STREAM_CASES:
            label = f"tma-stream k{tk} n{tn} s{st} p{progs}"
            try:
                fn = functools.partial(tma_stream, tile_k=tk, tile_n=tn, stages=st, programs=progs)
                us = loop_time_us(fn, [(token, w) for w in big])
                print(f"{label}: {us:7.1f} us {k * n * 2 / us / 1e6:5.2f} TB/s", flush=True)
                results.append((label, k * n * 2 / us / 1e6))
            except Exception as e:
                print(f"{label}: FAILED {type(e).__name__}: {str(e)[:400]}", flush=True)
    if "gemv" in args.parts:
        x = jax.random.normal(jax.random.fold_in(key, 1), (1, 11008), jnp.bfloat16)
        groups = [  # (label prefix, weight sets per shape, baselines, tilings)
            ("tma-wgmma", sets, {"xla": lambda x, w: x @ w, "kernel (tree default)": lambda x, w: qmm.quant_matmul(
                x, w, None, bits=16, group_size=0)}, GEMV_CASES),
            ("tma-wgmma-int8", [weight_sets(key, k, n, 8, k) for k, n in SHAPES],
             {"int8 kernel (tree default)": lambda x, q, s: qmm.quant_matmul(x, q, s, bits=8, group_size=q.shape[0])},
             INT8_CASES)]
        for prefix, weights, ops, cases in groups:
            for tk, tn, st, progs in cases:
                ops[f"{prefix} k{tk} n{tn} s{st} p{progs}"] = functools.partial(
                    gemv_wgmma, tile_k=tk, tile_n=tn, stages=st, programs=progs)
            for label, fn in ops.items():
                us = _layer(label, fn, x, weights)
                if us is not None:
                    results.append((label, us))
    print("\nsummary (stream: TB/s of the 4096 x 22016 read; gemv: us per 7B layer at M = 1):")
    for label, v in results:
        print(f"  {label:40s} {v:8.2f}")
