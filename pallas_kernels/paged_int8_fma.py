"""Paged decode attention over int8 pages with one query head per KV head (R = 1), without
tensor cores. Backend: Pallas-Triton (the inner step is CUDA inline PTX; interpret mode computes
the same values in jnp).

`paged_attention` (paged_attention.py, which checks the arguments and holds the float32
reference) sends int8 pages here when R = 1, as for Llama-2-7B and 13B; the layouts are that
module's: k_pages, v_pages [P, page_size, G, K] int8, scales [P, G, page_size] float32, block
tables [B, max_pages]. The grid is (B, G, num_splits); splits merge as in `split_k`.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton
from pallas_kernels.split_k import (
    FOLD_OFFSET, FOLD_SCALE, LOG2_E, MASK_VALUE, BlockSizes, bias_codes, int8_axpy4, int8_dot4, merge_splits,
    resolve_splits, split_outputs, split_range,
)


def _page_entry(key, page_size: int):
    """Logical positions (>= 0) -> (block table entry, slot in page): shifts for a power of 2."""
    if page_size & (page_size - 1):
        return key // page_size, key % page_size
    return key >> (page_size.bit_length() - 1), key & (page_size - 1)


# The FMA kernel rescales its sums only when a block's largest score passes the running max by more
# than this (log2 units): the probabilities then stay <= 2**8, and most blocks skip the rescale.
RESCALE_SLACK = 8.0


def _paged_fma_kernel(
    lengths_ref,  # [B] int32
    tables_ref,  # [max_pages] int32, block table of row b
    q_ref,  # [H, 4, W] float32, row b's queries times scale * log2(e): element 4w + i at [h, i, w]
    k_ref,  # [P * page_size, W] int32 words of 4 int8 codes, kv head g of every pool slot
    v_ref,  # [P * page_size, W]
    ks_ref,  # [P, page_size] float32 key scales of kv head g
    vs_ref,  # [P, page_size] float32
    o_ref,  # [H, 4, W] output (one split) or the float32 partial of split j, then m_ref, l_ref [H]
    *ml_refs,
    page_size: int,
    block_k: int,
    slice_k: int,
    num_splits: int,
    fold: bool,
    row_max: bool,
    compiled: bool,
):
    """Query head g of row b (R = 1) over the int8 pages of split j, without tensor cores.

    One query against int8 keys is a GEMV: a tensor-core dot pads it to 16 rows and feeds it codes
    unpacked from shared memory a byte at a time (about 6.7 instructions per byte of K and V on
    sm_90, so that kernel is issue-bound at half the bandwidth). Here each thread keeps its keys'
    codes as int32 words in registers and turns each byte into a float with one PRMT (`int8_dot4`,
    `int8_axpy4`). A step of block_k keys runs as slices of slice_k keys, one key row per thread
    in each, so the V sums ([slice_k, W] x 4, one float per thread and byte) take the slices in
    turn with FMAs and are reduced over keys once at the end. A step has one cross-thread
    reduction per slice (the scores over K) and one block max; the sums are rescaled only when the
    max grows by more than RESCALE_SLACK. With row_max, each key slot (row of the sums) keeps its
    own running max instead: no cross-warp max and no barrier per step, every step rescales its
    rows, and the rows are brought to one max at the end.
    """
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    words = k_ref.shape[-1]
    length = jnp.minimum(lengths_ref[b], tables_ref.shape[0] * page_size)
    lo, hi = split_range(length, block_k, num_splits, j)
    qs = [plgpu.load(q_ref.at[g, jnp.int32(i)])[None, :] for i in range(4)]  # [1, W]: x_i of each word
    q_sum = sum(jnp.sum(q) for q in qs) if fold else None
    slices = block_k // slice_k

    def load_block(blk):
        """Block blk's slices: (kw, vw [slice_k, W] int32, ks, vs [slice_k] float32, ok [slice_k]).
        Unmasked loads (no zero fill): the table index is clamped and a -1 entry reads page 0, so
        every read is inside the pool, and keys past the length are masked out of the sums."""
        out = []
        for n in range(slices):
            key = blk * block_k + n * slice_k + jnp.arange(slice_k)  # [slice_k] logical positions
            entry, slot = _page_entry(key, page_size)
            page = jnp.maximum(plgpu.load(tables_ref.at[jnp.minimum(entry, tables_ref.shape[0] - 1)]), 0)
            idx = (page * page_size + slot)[:, None], jnp.arange(words)[None, :]
            scale_idx = (page, slot)
            out.append((plgpu.load(k_ref.at[idx]), plgpu.load(v_ref.at[idx]), plgpu.load(ks_ref.at[scale_idx]),
                        plgpu.load(vs_ref.at[scale_idx]), key < length))
        return tuple(out)

    def step(carry, block):
        accs, l, w_sum, m = carry  # 4 x [slice_k, W], [slice_k], [slice_k], scalar ([slice_k] if row_max)
        scores = []
        for kw, _, ks, _, ok in block:
            s = jnp.sum(int8_dot4(bias_codes(kw), qs, fold, compiled), axis=1)  # [slice_k]: q . codes
            if fold:
                s = s * FOLD_SCALE - q_sum * FOLD_OFFSET
            scores.append(jnp.where(ok, s * ks, MASK_VALUE))
        top = functools.reduce(jnp.maximum, scores)  # elementwise first: one cross-thread max
        if row_max:
            m_new = jnp.maximum(m, top)  # [slice_k]
            alpha = jnp.exp2(m - m_new)
            accs, l, w_sum, m = tuple(a * alpha[:, None] for a in accs), l * alpha, w_sum * alpha, m_new
        else:
            top = jnp.max(top)

            def rescale(c):
                accs, l, w_sum, m = c
                alpha = jnp.exp2(m - top)
                return tuple(a * alpha for a in accs), l * alpha, w_sum * alpha, top

            accs, l, w_sum, m = lax.cond(top > m + RESCALE_SLACK, rescale, lambda c: c, (accs, l, w_sum, m))
        for s, (_, vw, _, vs, ok) in zip(scores, block):
            p = jnp.exp2(s - m)  # [slice_k], <= 2**RESCALE_SLACK
            if row_max:  # a slot may have seen no key yet (m = MASK_VALUE): mask its p too
                p = jnp.where(ok, p, 0.0)
            w = jnp.where(ok, p * vs, 0.0)  # a masked key's scale may be anything, even NaN
            accs = int8_axpy4(bias_codes(vw), w[:, None], accs, fold, compiled)
            l, w_sum = l + p, w_sum + w
        return accs, l, w_sum, m

    zeros = jnp.zeros((slice_k, words), jnp.float32)
    row = jnp.zeros((slice_k,), jnp.float32)
    init = (zeros,) * 4, row, row, jnp.full((slice_k,), MASK_VALUE) if row_max else jnp.float32(MASK_VALUE)

    def body(blk, c):
        # issued before this block's arithmetic, to be in flight meanwhile; the last step reloads
        # its own block (from L2) rather than reading a block past the split
        nxt = load_block(jnp.minimum(blk + 1, hi - 1))
        return step(*c), nxt

    carry, _ = lax.fori_loop(lo, hi, body, (init, load_block(lo)))
    accs, l, w_sum, m = carry
    if row_max:  # every slot's sums to the program's max (a slot that saw no key weighs 0)
        top = jnp.max(m)
        alpha = jnp.exp2(m - top)
        accs, l, w_sum, m = tuple(a * alpha[:, None] for a in accs), l * alpha, w_sum * alpha, top
    out = [jnp.sum(a, axis=0) for a in accs]  # [W] each
    if fold:
        total = jnp.sum(w_sum)
        out = [o * FOLD_SCALE - total * FOLD_OFFSET for o in out]
    l = jnp.sum(l)
    if not ml_refs:
        for i, o in enumerate(out):
            plgpu.store(o_ref.at[g, jnp.int32(i)], (o / jnp.where(l > 0.0, l, 1.0)).astype(o_ref.dtype))
        return
    m_ref, l_ref = ml_refs
    for i, o in enumerate(out):
        plgpu.store(o_ref.at[g, jnp.int32(i)], o)
    one = pl.ds(g, 1)
    plgpu.store(m_ref.at[one], jnp.full((1,), m, jnp.float32))
    plgpu.store(l_ref.at[one], jnp.full((1,), l, jnp.float32))


def paged_int8_fma(q, k_pages, v_pages, block_tables, lengths, k_scale_pages, v_scale_pages,
                    block_sizes: BlockSizes, interpret: bool) -> jax.Array:
    """paged_attention (checked there) over int8 pages with R = 1 -> [B, H, K] in q.dtype."""
    batch, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    words = head_dim // 4
    pool_rows = num_pages * page_size
    # float32 q folds away the sums' last bits; half-precision q is far coarser than the fold.
    fold = q.dtype != jnp.float32
    qs = (q.astype(jnp.float32) * (LOG2_E / math.sqrt(head_dim))).reshape(batch, num_heads, words, 4)
    qs = qs.transpose(0, 1, 3, 2)  # [B, H, 4, W]
    k_words, v_words = (lax.bitcast_convert_type(p.reshape(pool_rows, num_kv_heads, words, 4), jnp.int32)
                        for p in (k_pages, v_pages))  # [P * page_size, G, W], a bitcast
    num_splits = resolve_splits(block_sizes, batch * num_kv_heads, max_pages * page_size, programs_per_sm=2)
    block_k = block_sizes.block_k
    # one key row per thread in each slice: 4 words (16 bytes) a thread, W words a row
    slice_k = min(block_k, max(1, 128 * block_sizes.num_warps // words))
    kernel = functools.partial(_paged_fma_kernel, page_size=page_size, block_k=block_k, slice_k=slice_k,
                               num_splits=num_splits, fold=fold, row_max=block_sizes.row_max,
                               compiled=not interpret)
    kv_spec = pl.BlockSpec((pool_rows, None, words), lambda b, g, j: (0, g, 0))
    scale_spec = pl.BlockSpec((num_pages, None, page_size), lambda b, g, j: (0, g, 0))
    out_specs, out_shape = split_outputs(batch, num_splits, (num_heads, 4), words, q.dtype)
    if num_splits > 1:  # m and l per head: drop the 4 of the partial's [H, 4, W] rows
        out_specs[1:] = [pl.BlockSpec((None, None, num_heads), lambda b, g, j: (b, j, 0))] * 2
        out_shape[1:] = [jax.ShapeDtypeStruct((batch, num_splits, num_heads), jnp.float32)] * 2
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((batch,), lambda b, g, j: (0,)),
            pl.BlockSpec((None, max_pages), lambda b, g, j: (b, 0)),
            pl.BlockSpec((None, num_heads, 4, words), lambda b, g, j: (b, 0, 0, 0)),
            kv_spec, kv_spec, scale_spec, scale_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_triton.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        name="jllm_paged_attention_int8_fma",
    )(lengths, block_tables, qs, k_words, v_words, k_scale_pages, v_scale_pages)
    o = out if num_splits == 1 else out[0]
    o = jnp.swapaxes(o, -1, -2).reshape(*o.shape[:-2], head_dim)  # element 4w + i back in place
    if num_splits == 1:
        return o
    return merge_splits(o, out[1], out[2], group=1, dtype=q.dtype, interpret=interpret)
