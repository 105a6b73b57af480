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

`decode_attention_append` also stores the new key and value (the cache write of a decode step) and,
given RoPE frequencies, rotates q and the new key itself (rotate-half RoPE at position lengths[b]):
the q rows and each key are then read as two halves of K / 2 columns, and the scores are the sum of
two dots.
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
    LOG2_E, MASK_VALUE, BlockSizes, check_kv_dtypes, check_shapes, init_carry, merge_splits, num_sms,
    online_softmax_step, resolve_splits, split_aliased_outputs, split_outputs, split_range, store_result,
    with_aliased_outputs,
)

__all__ = ["BlockSizes", "decode_attention", "decode_attention_append", "decode_attention_ref",
           "default_block_sizes"]


def _decode_kernel(
    lengths_ref,  # [B] int32
    q_ref,  # [H, K] all query heads of row b
    k_ref,  # [S, K] kv head g of row b
    v_ref,  # [S, K]
    *refs,  # [ks_ref, vs_ref [S] float32 scales, int8 cache only], [append inputs], o_ref,
    # [m_ref, l_ref], [append outputs]
    quantized: bool,
    append: bool,
    rope: bool,
    group: int,
    rows: int,
    block_k: int,
    num_splits: int,
    scale: float,
):
    """Attention of the R heads of KV head g of row b over the keys of split j.

    o_ref [H, K] is the q.dtype output (num_splits == 1) or the float32 partial of split j, then
    m_ref, l_ref [H] float32 when num_splits > 1. With `append` the inputs go on with kv_len_ref
    [B] int32, kn_ref, vn_ref [K] (the new key and value of head g) and the outputs with
    k_out_ref, v_out_ref [S, K] (k_ref, v_ref's buffers): the keys s < lengths[b] are read from
    the cache, the new key at position lengths[b] comes from kn_ref (visible if kv_len[b] exceeds
    lengths[b]) and joins the last split, and split 0 stores it in the cache, at a position no
    program reads. With `rope` the append inputs end with inv_ref [K / 2] float32 and q and the new
    key are rotated at position lengths[b]; q, the cached keys and the new key are then handled as
    (first half, second half) column pairs.
    """
    scale_refs, refs = (refs[:2], refs[2:]) if quantized else ((), refs)
    n_new = 3 + rope if append else 0
    new_refs, refs = refs[:n_new], refs[n_new:]
    o_ref, *ml_refs = refs
    out_refs, ml_refs = (ml_refs[-2:], ml_refs[:-2]) if append else ((), ml_refs)
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = k_ref.shape[-1]
    cols = (pl.ds(0, head_dim // 2), pl.ds(head_dim // 2, head_dim // 2)) if rope else (slice(None),)
    length = jnp.minimum(lengths_ref[b], k_ref.shape[0])  # never read past the cache
    lo, hi = split_range(length, block_k, num_splits, j)
    head = g * group
    row_ok = jnp.arange(rows) < group  # [rows]; rows past R are zero padding for the dot
    q = tuple(plgpu.load(q_ref.at[pl.ds(head, rows), c], mask=row_ok[:, None], other=0.0) for c in cols)
    rotation = None
    if rope:  # q [rows, K / 2] x 2, rotated at the new key's position
        rotation = _rotation(new_refs[3], lengths_ref[b])
        q = _rotate(*q, *rotation, q_ref.dtype)
    else:
        q = q[0]  # [rows, K]
    qk_scale = scale * LOG2_E

    def body(i, carry):
        start = i * block_k
        key_ok = start + jnp.arange(block_k) < length  # [block_k]
        k = tuple(plgpu.load(k_ref.at[pl.ds(start, block_k), c], mask=key_ok[:, None], other=0.0)
                  for c in cols)  # [block_k, K] or two [block_k, K / 2]
        k = k if rope else k[0]
        v = plgpu.load(v_ref.at[pl.ds(start, block_k), :], mask=key_ok[:, None], other=0.0)  # [block_k, K]
        if not quantized:
            return online_softmax_step(q, k, v, key_ok, carry, qk_scale)
        ks_ref, vs_ref = scale_refs
        ks = plgpu.load(ks_ref.at[pl.ds(start, block_k)], mask=key_ok, other=0.0)  # [block_k] f32
        vs = plgpu.load(vs_ref.at[pl.ds(start, block_k)], mask=key_ok, other=0.0)  # [block_k] f32
        return online_softmax_step(q, k, v, key_ok, carry, qk_scale, k_scale=ks, v_scale=vs)

    acc, m, l = lax.fori_loop(lo, hi, body, init_carry(rows, head_dim))  # splits past the length run zero steps
    if append:
        acc, m, l = _append_key(q, new_refs, out_refs, lengths_ref[b], k_ref.shape[0], b, j, num_splits,
                                qk_scale, (acc, m, l), cols, rotation)
    store_result(o_ref, tuple(ml_refs), (pl.ds(head, rows),), row_ok, acc, m, l)


def _rotation(inv_ref, position) -> tuple[jax.Array, jax.Array]:
    """cos and sin [K / 2] float32 of the angles position * inv_freq."""
    angles = position.astype(jnp.float32) * plgpu.load(inv_ref)
    return jnp.cos(angles), jnp.sin(angles)


def _rotate(x1, x2, cos, sin, dtype) -> tuple[jax.Array, jax.Array]:
    """Rotate-half RoPE of the halves x1, x2 [..., K / 2] in float32, rounded to dtype."""
    x1, x2 = x1.astype(jnp.float32), x2.astype(jnp.float32)
    return (x1 * cos - x2 * sin).astype(dtype), (x2 * cos + x1 * sin).astype(dtype)


def _append_key(q, new_refs, out_refs, old, seq_len, b, j, num_splits, qk_scale, carry, cols, rotation):
    """The new key of `_decode_kernel`'s append mode: one more online-softmax step in the last
    split (elementwise: a dot needs 16 keys), and its store into the cache by split 0 (rotated
    first where `rotation` is given; q is then a pair of halves)."""
    kv_len_ref, kn_ref, vn_ref = new_refs[:3]
    kn, vn = tuple(plgpu.load(kn_ref.at[c]) for c in cols), plgpu.load(vn_ref)  # [K] or two [K / 2]; [K]
    k_out_ref, v_out_ref = out_refs
    if rotation is not None:
        kn = _rotate(*kn, *rotation, k_out_ref.dtype)
    qs = q if rotation is not None else (q,)
    acc, m, l = carry
    take = (kv_len_ref[b] > old) & (old < seq_len) & (j == num_splits - 1)
    s = jnp.sum(qs[0].astype(jnp.float32) * kn[0].astype(jnp.float32)[None, :], axis=1)  # [rows]
    for qc, kc in zip(qs[1:], kn[1:]):
        s = s + jnp.sum(qc.astype(jnp.float32) * kc.astype(jnp.float32)[None, :], axis=1)
    s = s * qk_scale
    m_new = jnp.where(take, jnp.maximum(m, s), m)
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(take, jnp.exp2(s - m_new), 0.0)  # [rows]
    acc = acc * alpha[:, None] + p[:, None] * vn.astype(jnp.float32)[None, :]

    @pl.when((j == 0) & (old < seq_len))
    def _():
        for c, kc in zip(cols, kn):
            plgpu.store(k_out_ref.at[pl.ds(old, 1), c], kc[None, :].astype(k_out_ref.dtype))
        plgpu.store(v_out_ref.at[pl.ds(old, 1), :], vn[None, :].astype(v_out_ref.dtype))

    return acc, m_new, l * alpha + p


# A float cache's tiling where the grid holds at least this many (row, KV head) programs per SM:
# 2 pipeline stages instead of 4 (half the shared memory, more programs resident). On an H100,
# 7B batch 64 at context ~136: the kernel 70.7 -> 67.5 us, decode TPOT 9.34 -> 9.17 ms; at 2,000
# keys 728 -> 723 us; batch 8 (below the threshold) unchanged (docs/PERFORMANCE.md, fifteenth round).
MANY_PROGRAMS_PER_SM = 2


def default_block_sizes(programs: int, quantized: bool) -> BlockSizes:
    """BlockSizes() for `programs` (row, KV head) programs, with 2 stages for a float cache when
    they are at least MANY_PROGRAMS_PER_SM per SM (then the length is not split either)."""
    if not quantized and programs >= MANY_PROGRAMS_PER_SM * num_sms():
        return BlockSizes(num_stages=2)
    return BlockSizes()


def _decode_call(
    q: jax.Array,  # [B, H, K]
    k: jax.Array,  # [B, S, G, K]
    v: jax.Array,  # [B, S, G, K]
    lengths: jax.Array,  # [B] int32
    k_scale: jax.Array | None,  # [B, G, S] float32, int8 cache only
    v_scale: jax.Array | None,  # [B, G, S] float32, int8 cache only
    block_sizes: BlockSizes | None,  # None: default_block_sizes
    interpret: bool,
    new: tuple = (),  # append mode: (kv_len [B] int32, k_new, v_new [B, G, K] in the cache dtype
    # [, inv_freq [K / 2] float32: rotate q and k_new])
):  # [B, H, K]; append mode: (out, k, v)
    batch, num_heads, head_dim = q.shape
    seq_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    quantized = k_scale is not None
    block_sizes = block_sizes or default_block_sizes(batch * num_kv_heads, quantized)
    block_k = min(block_sizes.block_k, max(16, pl.next_power_of_2(seq_len)))
    num_splits = resolve_splits(dataclasses.replace(block_sizes, block_k=block_k), batch * num_kv_heads, seq_len)
    append = bool(new)
    kernel = functools.partial(
        _decode_kernel,
        quantized=quantized,
        append=append,
        rope=len(new) == 4,
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
    aliases = {}
    if append:  # the new key and value of head g of row b; the cache buffers are also outputs
        new_spec = pl.BlockSpec((None, None, head_dim), lambda b, g, j: (b, g, 0))
        in_specs += [pl.BlockSpec((batch,), lambda b, g, j: (0,)), new_spec, new_spec]
        if len(new) == 4:
            in_specs.append(pl.BlockSpec((head_dim // 2,), lambda b, g, j: (0,)))
        args += list(new)
        out_specs, out_shape, aliases = with_aliased_outputs(out_specs, out_shape, num_splits,
                                                             [(2, kv_spec, k), (3, kv_spec, v)])
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_triton.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        name="jllm_decode_attention_int8" if quantized else
        "jllm_decode_attention_append" if append else "jllm_decode_attention",
    )(*args)
    cache = ()
    if append:
        out, cache = split_aliased_outputs(out, num_splits, 2)
    if num_splits > 1:
        out = merge_splits(*out, group=group, dtype=q.dtype, interpret=interpret)
    return (out, *cache) if append else out


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
    return _decode_call(q, k, v, lengths.astype(jnp.int32), k_scale, v_scale, block_sizes,
                        interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def decode_attention_append(
    q: jax.Array,  # [B, H, K]
    k: jax.Array,  # [B, S, G, K] float
    v: jax.Array,  # [B, S, G, K] float
    lengths: jax.Array,  # [B] int32 keys already cached
    kv_len: jax.Array,  # [B] int32: the new key is visible where kv_len[b] > lengths[b]
    k_new: jax.Array,  # [B, G, K]
    v_new: jax.Array,  # [B, G, K]
    *,
    inv_freq: jax.Array | None = None,  # [K / 2] float32 RoPE frequencies
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Decode with the cache write in the same kernel: store k_new, v_new at position lengths[b]
    of k, v (dropped where lengths[b] >= S) and attend q over keys s < lengths[b] plus the new one
    -> (out [B, H, K], k, v). k and v are updated in place where the caller donates them.

    With inv_freq, q and k_new are given before RoPE: the kernel rotates both (rotate-half, angles
    lengths[b] * inv_freq, in float32, rounded to q's and the cache's dtype) before it uses them,
    and the rotated key is what it stores."""
    if k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]:
        raise ValueError(f"expected k = v [B, S, G, K]; got {q.shape=} {k.shape=} {v.shape=}")
    check_kv_dtypes(k, v, None, None)
    check_shapes(q, k.shape[2], k.shape[3])
    want = (k.shape[0], k.shape[2], k.shape[3])
    if k_new.shape != want or v_new.shape != want:
        raise ValueError(f"expected k_new = v_new [B, G, K] = {want}; got {k_new.shape=} {v_new.shape=}")
    # A key to rotate keeps its dtype: the kernel rounds it to the cache's once, after RoPE.
    new = (kv_len.astype(jnp.int32), k_new if inv_freq is not None else k_new.astype(k.dtype), v_new.astype(v.dtype))
    if inv_freq is not None:
        if inv_freq.shape != (k.shape[3] // 2,):
            raise ValueError(f"expected inv_freq [K / 2] = ({k.shape[3] // 2},); got {inv_freq.shape}")
        new = (*new, inv_freq.astype(jnp.float32))
    return _decode_call(q, k, v, lengths.astype(jnp.int32), None, None, block_sizes,
                        interpret, new)


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
