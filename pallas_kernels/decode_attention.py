"""Decode attention (one query token per row) over the static KV cache in Pallas, Triton backend.

q [B, H, K] attends keys s < lengths[b] of k, v [B, S, G, K]. The grid is (B, G, num_splits): one
program owns all R = H / G query heads of one KV head (the R rows form the M side of a small
tensor-core dot, padded to 16) and one slice of the row's real length, so each K/V byte is read
once. Splitting the length (split-K, "flash decoding") lets batch 1 with a long context fill the
GPU; each split leaves an unnormalised partial output with its running max m and sum l, and a
second small kernel (`merge_splits`) combines them with a log-sum-exp merge. The split boundaries
are computed from lengths[b] inside the kernel, so work and bytes follow the real length, not S,
and short rows do not leave most programs idle.

int8 cache: k, v may be int8 with per-token, per-KV-head float32 scales k_scale, v_scale [B, G, S]
(key s of head g = k[b, s, g] * k_scale[b, g, s]; [B, G, S] so one head's scales are contiguous). The kernel dequantizes in registers: the int8 block is converted to
q's dtype for the dots (exact in bf16), k_scale multiplies the score columns and v_scale the
probabilities before the PV dot, so it reads K + 4 bytes per key and head for each of k and v.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton
from pallas_kernels.kv_quant import dequantize_kv
from pallas_kernels.split_k import (
    LOG2_E, MASK_VALUE, BlockSizes, check_kv_dtypes, check_shapes, init_carry, merge_splits,
    online_softmax_step, resolve_splits, split_outputs, split_range, store_result,
)

__all__ = ["BlockSizes", "decode_attention", "decode_attention_ref"]


def _decode_kernel(
    lengths_ref,  # [B] int32
    q_ref,  # [H, K] all query heads of row b
    k_ref,  # [S, K] kv head g of row b
    v_ref,  # [S, K]
    *refs,  # [ks_ref, vs_ref [S] float32 scales, int8 cache only], o_ref, [m_ref, l_ref]
    quantized: bool,
    group: int,
    rows: int,
    block_k: int,
    num_splits: int,
    scale: float,
):
    """Attention of the R heads of KV head g of row b over the keys of split j.

    o_ref [H, K] is the q.dtype output (num_splits == 1) or the float32 partial of split j, then
    m_ref, l_ref [H] float32 when num_splits > 1.
    """
    scale_refs, (o_ref, *ml_refs) = (refs[:2], refs[2:]) if quantized else ((), refs)
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = k_ref.shape[-1]
    length = jnp.minimum(lengths_ref[b], k_ref.shape[0])  # never read past the cache
    lo, hi = split_range(length, block_k, num_splits, j)
    head = g * group
    row_ok = jnp.arange(rows) < group  # [rows]; rows past R are zero padding for the dot
    q = plgpu.load(q_ref.at[pl.ds(head, rows), :], mask=row_ok[:, None], other=0.0)  # [rows, K]
    qk_scale = scale * LOG2_E

    def body(i, carry):
        start = i * block_k
        key_ok = start + jnp.arange(block_k) < length  # [block_k]
        k = plgpu.load(k_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0.0)  # [block_k, K]
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0.0)  # [block_k, K]
        if not quantized:
            return online_softmax_step(q, k, v, key_ok, carry, qk_scale)
        ks_ref, vs_ref = scale_refs
        ks = plgpu.load(ks_ref.at[pl.ds(start, block_k)], mask=key_ok, other=0.0)  # [block_k] f32
        vs = plgpu.load(vs_ref.at[pl.ds(start, block_k)], mask=key_ok, other=0.0)  # [block_k] f32
        return online_softmax_step(q, k, v, key_ok, carry, qk_scale, k_scale=ks, v_scale=vs)

    acc, m, l = lax.fori_loop(lo, hi, body, init_carry(rows, head_dim))  # splits past the length run zero steps
    store_result(o_ref, tuple(ml_refs), (pl.ds(head, rows),), row_ok, acc, m, l)


def _decode_call(
    q: jax.Array,  # [B, H, K]
    k: jax.Array,  # [B, S, G, K]
    v: jax.Array,  # [B, S, G, K]
    lengths: jax.Array,  # [B] int32
    k_scale: jax.Array | None,  # [B, G, S] float32, int8 cache only
    v_scale: jax.Array | None,  # [B, G, S] float32, int8 cache only
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:  # [B, H, K]
    batch, num_heads, head_dim = q.shape
    seq_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    quantized = k_scale is not None
    block_k = min(block_sizes.block_k, max(16, pl.next_power_of_2(seq_len)))
    num_splits = resolve_splits(dataclasses.replace(block_sizes, block_k=block_k), batch * num_kv_heads, seq_len)
    kernel = functools.partial(
        _decode_kernel,
        quantized=quantized,
        group=group,
        rows=max(16, pl.next_power_of_2(group)),
        block_k=block_k,
        num_splits=num_splits,
        scale=1.0 / math.sqrt(head_dim),
    )
    out_specs, out_shape = split_outputs(batch, num_splits, (num_heads,), head_dim, q.dtype)
    kv_spec = pl.BlockSpec((None, seq_len, None, head_dim), lambda b, g, j: (b, 0, g, 0))
    in_specs = [
        pl.BlockSpec((batch,), lambda b, g, j: (0,)),
        pl.BlockSpec((None, num_heads, head_dim), lambda b, g, j: (b, 0, 0)),
        kv_spec,
        kv_spec,
    ]
    args = [lengths, q, k, v]
    if quantized:  # the scales of KV head g of row b: [S], contiguous
        scale_spec = pl.BlockSpec((None, None, seq_len), lambda b, g, j: (b, g, 0))
        in_specs += [scale_spec, scale_spec]
        args += [k_scale, v_scale]
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_triton.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        name="jllm_decode_attention_int8" if quantized else "jllm_decode_attention",
    )(*args)
    if num_splits == 1:
        return out
    return merge_splits(*out, group=group, dtype=q.dtype, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def decode_attention(
    q: jax.Array,  # [B, H, K]
    k: jax.Array,  # [B, S, G, K], int8 with k_scale
    v: jax.Array,  # [B, S, G, K], int8 with v_scale
    lengths: jax.Array,  # [B] int32, >= 1
    *,
    k_scale: jax.Array | None = None,  # [B, G, S] float32: key s of head g = k[b, s, g] * k_scale[b, g, s]
    v_scale: jax.Array | None = None,  # [B, G, S] float32
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """One query per row over keys s < lengths[b]: q [B, H, K], k, v [B, S, G, K] -> [B, H, K]."""
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"expected k = v [B, S, G, K]; got {q.shape=} {k.shape=} {v.shape=}")
    check_kv_dtypes(k, v, k_scale, v_scale)
    check_shapes(q, k.shape[2], k.shape[3])
    return _decode_call(q, k, v, lengths.astype(jnp.int32), k_scale, v_scale, block_sizes or BlockSizes(),
                        interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def decode_attention_ref(
    q: jax.Array,  # [B, H, K]
    k: jax.Array,  # [B, S, G, K], int8 with k_scale
    v: jax.Array,  # [B, S, G, K], int8 with v_scale
    lengths: jax.Array,  # [B] int32
    *,
    k_scale: jax.Array | None = None,  # [B, G, S] float32
    v_scale: jax.Array | None = None,  # [B, G, S] float32
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pure-jnp float32 twin of decode_attention -> [B, H, K] in q.dtype."""
    del block_sizes, interpret
    check_kv_dtypes(k, v, k_scale, v_scale)
    if k_scale is not None:  # dequantize the whole cache in float32, then the same math
        k, v = dequantize_kv(k, k_scale, jnp.float32), dequantize_kv(v, v_scale, jnp.float32)  # [B, S, G, K]
    batch, num_heads, head_dim = q.shape
    seq_len, num_kv_heads = k.shape[1], k.shape[2]
    qf = q.astype(jnp.float32).reshape(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)  # [B, G, R, K]
    logits = jnp.einsum("bgrk,bsgk->bgrs", qf, k.astype(jnp.float32)) / math.sqrt(head_dim)
    key_ok = jnp.arange(seq_len)[None, :] < lengths[:, None]  # [B, S]
    logits = jnp.where(key_ok[:, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)  # [B, G, R, S]
    out = jnp.einsum("bgrs,bsgk->bgrk", probs, v.astype(jnp.float32))  # [B, G, R, K]
    return out.reshape(q.shape).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# Benchmark: PYTHONPATH=. python -m pallas_kernels.decode_attention
import time

from pallas_kernels.kv_quant import quantize_kv


def time_us(fn, arg_sets: list[tuple], trials: int = 15, reps: int = 8) -> float:
    """Median per-call time of fn in microseconds.

    One jit runs fn over every input set back to back (distinct inputs, so nothing is cached in
    L2 or merged by XLA); each trial dispatches it `reps` times asynchronously and syncs once, so
    host dispatch overlaps the GPU work.
    """
    many = jax.jit(lambda sets: [fn(*args) for args in sets])
    jax.block_until_ready(many(arg_sets))
    start = time.perf_counter()
    while time.perf_counter() - start < 0.2:  # let the clocks ramp up again after compiling
        jax.block_until_ready(many(arg_sets))
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        outs = [many(arg_sets) for _ in range(reps)]
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - start) / (reps * len(arg_sets)))
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    out = out.astype(jnp.float32)
    ref = ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def best_config(name: str, kernel, configs: list, args: tuple, ref: jax.Array, arg_sets: list,
                rate) -> tuple | None:
    """For each tiling (None: the default), check kernel(*args, block_sizes=cfg) against ref and time
    it over arg_sets, printing one line each (`rate(us)` formats the throughput). Returns the
    fastest (us, rel err, cfg), or None when every tiling failed. Shared by the kernels' main()."""
    best = None
    for cfg in configs:
        op = functools.partial(kernel, block_sizes=cfg)
        try:
            with _triton.quiet():
                err = rel_err(op(*args), ref)
                us = time_us(op, arg_sets)
        except Exception as e:  # report and keep sweeping
            print(f"{name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"{name} {cfg or 'default'}: {us:8.1f} us {rate(us)} err {err:.2e}", flush=True)
        if best is None or us < best[0]:
            best = (us, err, cfg)
    return best


def print_header(check_lines: list[str]) -> None:
    """The first lines of every kernel's main(): jax version, device, then the GPU checks."""
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}")
    for line in check_lines:
        print(line, flush=True)


def num_sets(nbytes: int) -> int:
    """Input copies to rotate through so repeated calls do not run out of the 50 MB L2."""
    return max(2, min(16, pl.cdiv(256 * 2**20, nbytes)))


def _inputs(key, batch, seq_len, heads, kv_heads, head_dim, dtype):
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, heads, head_dim), dtype)
    k = jax.random.normal(kk, (batch, seq_len, kv_heads, head_dim), dtype)
    v = jax.random.normal(kv, (batch, seq_len, kv_heads, head_dim), dtype)
    return q, k, v, jnp.full((batch,), seq_len, jnp.int32)


def _int8_inputs(key, batch, seq_len, heads, kv_heads, head_dim):
    """bf16 q with an int8 cache quantized from normal keys and values: (q, k, v, lengths, k_scale, v_scale)."""
    q, k, v, lengths = _inputs(key, batch, seq_len, heads, kv_heads, head_dim, jnp.bfloat16)
    (k, k_scale), (v, v_scale) = jax.jit(quantize_kv)(k), jax.jit(quantize_kv)(v)
    return q, k, v, lengths, k_scale, v_scale


def _decode_int8(q, k, v, lengths, k_scale, v_scale, *, block_sizes=None):
    """decode_attention with the scales positional, for time_us and best_config."""
    return decode_attention(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale, block_sizes=block_sizes)


def _decode_int8_ref(q, k, v, lengths, k_scale, v_scale):
    return decode_attention_ref(q, k, v, lengths, k_scale=k_scale, v_scale=v_scale)


def _kv_bytes(batch: int, seq_len: int, kv_heads: int, head_dim: int, cache: str) -> int:
    """Bytes of k and v read at full length: bf16 values, or int8 values plus a float32 scale per
    token and KV head."""
    per_head = 2 * head_dim if cache == "bf16" else head_dim + 4
    return 2 * batch * seq_len * kv_heads * per_head


def _ragged_check() -> list[str]:
    """GPU correctness on ragged lengths (1, a block boundary, full) and GQA, bf16 and int8 cache."""
    lines = []
    for i, (heads, kv_heads, head_dim, lengths) in enumerate([
        (32, 32, 128, [1, 64, 4096, 1000]), (64, 8, 128, [4095, 1, 129, 2048]), (32, 8, 64, [7, 4096, 300, 65]),
    ]):
        q, k, v, _ = _inputs(jax.random.key(100 + i), len(lengths), 4096, heads, kv_heads, head_dim, jnp.bfloat16)
        lengths = jnp.array(lengths, jnp.int32)
        (k8, k_scale), (v8, v_scale) = jax.jit(quantize_kv)(k), jax.jit(quantize_kv)(v)
        with jax.default_matmul_precision("highest"):
            ref = decode_attention_ref(q, k, v, lengths)
            ref8 = decode_attention_ref(q, k8, v8, lengths, k_scale=k_scale, v_scale=v_scale)
        with _triton.quiet():
            out = decode_attention(q, k, v, lengths)
            out8 = decode_attention(q, k8, v8, lengths, k_scale=k_scale, v_scale=v_scale)
        shape = f"H={heads} G={kv_heads} K={head_dim} lengths={lengths.tolist()}"
        lines.append(f"ragged {shape}: rel err {rel_err(out, ref):.2e}")
        # int8 errs more than bf16 against its ref (~3e-3 vs ~4e-4 on CPU): p * v_scale is rounded
        # to bf16 even where p = 1, i.e. in the length-1 row, whose output dominates the norm.
        lines.append(f"ragged int8 {shape}: rel err {rel_err(out8, ref8):.2e} vs int8 ref, "
                     f"{rel_err(out8, ref):.2e} vs bf16 cache (quantization)")
    return lines


def main() -> None:
    import sys

    print_header(_ragged_check())
    tune = "--tune" in sys.argv
    rows = []
    tuned = {(1, 4096), (1, 2048), (1, 512), (8, 512)}
    shapes = [(b, s, 32, 32, 128) for b in (1, 8, 64) for s in (512, 2048, 4096)]
    shapes += [(1, 4096, 64, 8, 128), (8, 4096, 64, 8, 128), (1, 4096, 32, 8, 128)]
    candidates = [
        BlockSizes(block_k=bk, num_splits=ns, num_warps=w, num_stages=st)
        for bk, ns, w, st in [
            (64, 2, 4, 3), (64, 4, 4, 3), (64, 8, 4, 3), (64, 16, 4, 3),
            (128, None, 4, 2), (64, None, 4, 4), (32, None, 4, 4), (64, None, 8, 3),
        ]
    ]
    for batch, seq_len, heads, kv_heads, head_dim in shapes:
        name = f"B={batch} S={seq_len} H={heads} G={kv_heads} K={head_dim}"
        configs = [None] + (candidates if tune and (batch, seq_len) in tuned else [])
        for cache in ("bf16", "int8"):
            if cache == "bf16":
                make = functools.partial(_inputs, dtype=jnp.bfloat16)
                kernel, xla = decode_attention, decode_attention_ref
            else:
                make, kernel, xla = _int8_inputs, _decode_int8, _decode_int8_ref
            args = make(jax.random.key(0), batch, seq_len, heads, kv_heads, head_dim)
            with jax.default_matmul_precision("highest"):
                ref = xla(*args)
            nbytes = _kv_bytes(batch, seq_len, kv_heads, head_dim, cache)
            sets = [make(jax.random.key(10 + i), batch, seq_len, heads, kv_heads, head_dim)
                    for i in range(num_sets(nbytes))]
            best = best_config(f"{name} {cache}", kernel, configs, args, ref, sets,
                               lambda us, nbytes=nbytes: f"{nbytes / us / 1e6:5.2f} TB/s")
            xla_us = time_us(xla, sets)
            if best is not None:
                rows.append((name, cache, nbytes, best[0], best[1], xla_us, best[2]))
            del sets, args
    print("\ndecode_attention, full lengths, TB/s over KV bytes read (int8: values + float32 scales; "
          "H100 read peak 3.13 TB/s); rel err against the _ref of the same cache")
    print(f"{'shape':34s} {'cache':5s} {'KV MB':>7s} {'pallas us':>10s} {'TB/s':>6s} {'%peak':>6s}"
          f" {'rel err':>9s} {'xla us':>9s} {'TB/s':>6s}  best config")
    for name, cache, nbytes, us, err, xus, cfg in rows:
        tbs = nbytes / us / 1e6
        print(f"{name:34s} {cache:5s} {nbytes / 1e6:7.1f} {us:10.1f} {tbs:6.2f} {100 * tbs / 3.13:5.0f}%"
              f" {err:9.2e} {xus:9.1f} {nbytes / xus / 1e6:6.2f}  {cfg or 'default'}")


if __name__ == "__main__":
    main()
