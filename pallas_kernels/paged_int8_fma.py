"""Paged decode attention over int8 pages with one query head per KV head (R = 1), without
tensor cores. Backend: Pallas-Triton (the inner step is CUDA inline PTX; interpret mode computes
the same values in jnp).

`paged_attention` (paged_attention.py, which checks the arguments and holds the float32
reference) sends int8 pages here when R = 1, as for Llama-2-7B and 13B; the layouts are that
module's: k_pages, v_pages [P, page_size, G, K] int8, scales [P, G, page_size] float32, block
tables [B, max_pages]. The grid is (B, G, num_splits); splits merge as in `split_k`.

Append mode (`new`): the kernel also takes each row's new key and value (after RoPE), rounds them
to int8 codes and a scale exactly as `kv_quant.quantize_kv` does, stores them at slot lengths[b]
of the row's pages (split 0 of each row and head; the slot's page must be in the table) and
attends them as one more key in the last split. A decode step over an int8 cache then runs no
quantize or scatter kernels of its own.
"""
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton
from pallas_kernels.kv_quant import INV_127
from pallas_kernels.split_k import (
    FOLD_OFFSET, FOLD_SCALE, LOG2_E, MASK_VALUE, BlockSizes, bias_codes, int8_axpy4, int8_dot4, merge_splits,
    resolve_splits, split_aliased_outputs, split_outputs, split_range, with_aliased_outputs,
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
    q_ref,  # [H, W, 4] float32, row b's queries times scale * log2(e) (element 4w + i at [h, w, i])
    k_ref,  # [P * page_size, W] int32 words of 4 int8 codes, kv head g of every pool slot
    v_ref,  # [P * page_size, W]
    ks_ref,  # [P, page_size] float32 key scales of kv head g
    vs_ref,  # [P, page_size] float32
    *refs,  # [append inputs], o_ref [H, W, 4] output (one split) or the float32 partial of split
    # j, then m_ref, l_ref [H], then [append outputs]
    page_size: int,
    block_k: int,
    slice_k: int,
    num_splits: int,
    fold: bool,
    row_max: bool,
    append: bool,
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

    q, the output and the new key and value come as [W, 4] per head: the K-vector as it is stored,
    so XLA needs no transposes around the kernel; `_column` takes byte i of each word from it.
    With `append`, refs start with kv_len_ref [B] int32 and kn_ref, vn_ref [W, 4] (the new key and
    value of head g) and end with k_out_ref, v_out_ref, ks_out_ref, vs_out_ref (k_ref .. vs_ref's
    buffers): `_new_key` rounds and stores the new key while the first block loads, and
    `_attend_new_key` adds it after the last.
    """
    new_refs, refs = (refs[:3], refs[3:]) if append else ((), refs)
    out_refs, refs = (refs[-4:], refs[:-4]) if append else ((), refs)
    o_ref, *ml_refs = refs
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    words = k_ref.shape[-1]
    length = jnp.minimum(lengths_ref[b], tables_ref.shape[0] * page_size)
    lo, hi = split_range(length, block_k, num_splits, j)
    q2 = plgpu.load(q_ref.at[g])  # [W, 4] float32: query g of row b, element 4w + i at [w, i]
    qs = [_column(q2, i)[None, :] for i in range(4)]  # [1, W]: x_i of each word
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

    first = load_block(lo)
    # the new key's rounding and store while the first block's loads are in flight
    new = _new_key(q2, new_refs, out_refs, tables_ref, lengths_ref[b], j, page_size, compiled) if append else None
    carry, _ = lax.fori_loop(lo, hi, body, (init, first))
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
    if append:
        out, m, l = _attend_new_key(new, (out, m, l), new_refs[0][b] > lengths_ref[b], j == num_splits - 1)
    if not ml_refs:
        out = [o / jnp.where(l > 0.0, l, 1.0) for o in out]
    plgpu.store(o_ref.at[g], _natural(out).astype(o_ref.dtype))
    if ml_refs:
        m_ref, l_ref = ml_refs
        one = pl.ds(g, 1)
        plgpu.store(m_ref.at[one], jnp.full((1,), m, jnp.float32))
        plgpu.store(l_ref.at[one], jnp.full((1,), l, jnp.float32))


def _column(x2, i: int):
    """[W, 4] -> [W]: the elements 4w + i (byte i of each word), as a masked sum over the 4 (the
    FMA loop compiles to as many sm_90 instructions as with q handed over in [4, W])."""
    return jnp.sum(jnp.where(jnp.arange(4)[None, :] == i, x2, 0), axis=1)


def _natural(cols: list):
    """4 x [W] (element 4w + i at cols[i][w]) -> [W, 4], the natural layout of a K-vector."""
    lane = jnp.arange(4)[None, :]
    return sum(jnp.where(lane == i, c[:, None], 0.0) for i, c in enumerate(cols))


def _div_rn(x, y, compiled: bool):
    """x / y rounded to nearest (IEEE) as XLA divides: Triton's own float32 division is approximate."""
    if not compiled:
        return x / y
    return plgpu.elementwise_inline_asm("div.rn.f32 $0, $1, $2;", args=[x, y], constraints="=r,r,r", pack=1,
                                        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _mul_round(x, y, compiled: bool):
    """round-half-even(x * y) as int32 (jnp.round of the float32 product, as XLA computes it)."""
    if not compiled:
        return jnp.round(x * y).astype(jnp.int32)
    return plgpu.elementwise_inline_asm(
        "{\n.reg .f32 t;\nmul.rn.f32 t, $1, $2;\ncvt.rni.s32.f32 $0, t;\n}", args=[x, y], constraints="=r,r,r",
        pack=1, result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)])[0]


def _quantize_row(x2, compiled: bool) -> tuple[jax.Array, jax.Array]:
    """One token's K values of one head, [W, 4] float32 -> (int32 codes [W, 4] in [-127, 127],
    float32 scale): `quantize_kv`'s rounding, bit for bit (max|x| * INV_127, then x * (1 / scale)
    rounded half to even)."""
    scale = jnp.max(jnp.abs(x2)) * INV_127
    den = jnp.broadcast_to(jnp.where(scale == 0.0, 1.0, scale), x2.shape)
    inv = _div_rn(jnp.ones_like(x2), den, compiled)
    return jnp.clip(_mul_round(x2, inv, compiled), -127, 127), scale


def _new_key(q2, new_refs, out_refs, tables_ref, old, j, page_size, compiled):
    """The new key of `_paged_fma_kernel`'s append mode, at slot `old` (= lengths[b]): rounded to
    int8 as the cache's other keys are, stored with its value by split 0 where the slot's page is
    in the table -> (its score, its value's codes [W, 4] and scale, whether it is stored)."""
    _, kn_ref, vn_ref = new_refs
    k_out_ref, v_out_ref, ks_out_ref, vs_out_ref = out_refs
    kc, ks = _quantize_row(plgpu.load(kn_ref).astype(jnp.float32), compiled)
    vc, vs = _quantize_row(plgpu.load(vn_ref).astype(jnp.float32), compiled)
    entry, slot = _page_entry(old, page_size)
    page = plgpu.load(tables_ref.at[jnp.minimum(entry, tables_ref.shape[0] - 1)])
    fits = (entry < tables_ref.shape[0]) & (page >= 0)

    @pl.when((j == 0) & fits)
    def _():
        row = pl.ds(page * page_size + slot, 1)
        shift = 8 * jnp.arange(4)[None, :]
        for ref, codes in ((k_out_ref, kc), (v_out_ref, vc)):  # disjoint bytes: the sum is their OR
            plgpu.store(ref.at[row, :], jnp.sum((codes & 0xFF) << shift, axis=1)[None, :])
        for ref, scale in ((ks_out_ref, ks), (vs_out_ref, vs)):
            plgpu.store(ref.at[pl.ds(page, 1), pl.ds(slot, 1)], jnp.full((1, 1), scale, jnp.float32))

    score = jnp.sum(q2 * kc.astype(jnp.float32)) * ks  # q carries the softmax scale
    return score, vc, vs, fits


def _attend_new_key(new, carry, visible, last_split):
    """One more online-softmax step for the new key (`_new_key`), in the last split, where kv_len
    makes it visible and it was stored: (out 4 x [W], m, l) -> the same."""
    score, vc, vs, fits = new
    out, m, l = carry
    take = visible & fits & last_split
    m_new = jnp.where(take, jnp.maximum(m, score), m)
    alpha = jnp.exp2(m - m_new)
    p = jnp.where(take, jnp.exp2(score - m_new), 0.0)
    out = [o * alpha + (p * vs) * _column(vc, i).astype(jnp.float32) for i, o in enumerate(out)]
    return out, m_new, l * alpha + p


def paged_int8_fma(q, k_pages, v_pages, block_tables, lengths, k_scale_pages, v_scale_pages,
                    block_sizes: BlockSizes, interpret: bool, new: tuple = ()):
    """paged_attention (checked there) over int8 pages with R = 1 -> [B, H, K] in q.dtype.

    new = (kv_len [B] int32, k_new, v_new [B, G, K]): append mode (module docstring) -> (out,
    k_pages, v_pages, k_scale_pages, v_scale_pages), the pages updated in place where donated."""
    batch, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    words = head_dim // 4
    pool_rows = num_pages * page_size
    # float32 q folds away the sums' last bits; half-precision q is far coarser than the fold.
    fold = q.dtype != jnp.float32
    # [B, H, W, 4]: a reshape, so the scaling fuses into whatever XLA computes q with (RoPE)
    qs = (q.astype(jnp.float32) * (LOG2_E / math.sqrt(head_dim))).reshape(batch, num_heads, words, 4)
    k_words, v_words = (lax.bitcast_convert_type(p.reshape(pool_rows, num_kv_heads, words, 4), jnp.int32)
                        for p in (k_pages, v_pages))  # [P * page_size, G, W], a bitcast
    num_splits = resolve_splits(block_sizes, batch * num_kv_heads, max_pages * page_size, programs_per_sm=2)
    block_k = block_sizes.block_k
    # one key row per thread in each slice: 4 words (16 bytes) a thread, W words a row
    slice_k = min(block_k, max(1, 128 * block_sizes.num_warps // words))
    append = bool(new)
    kernel = functools.partial(_paged_fma_kernel, page_size=page_size, block_k=block_k, slice_k=slice_k,
                               num_splits=num_splits, fold=fold, row_max=block_sizes.row_max, append=append,
                               compiled=not interpret)
    kv_spec = pl.BlockSpec((pool_rows, None, words), lambda b, g, j: (0, g, 0))
    scale_spec = pl.BlockSpec((num_pages, None, page_size), lambda b, g, j: (0, g, 0))
    out_specs, out_shape = split_outputs(batch, num_splits, (num_heads, words), 4, q.dtype)
    if num_splits > 1:  # m and l per head: drop the W of the partial's [H, W, 4] rows
        out_specs[1:] = [pl.BlockSpec((None, None, num_heads), lambda b, g, j: (b, j, 0))] * 2
        out_shape[1:] = [jax.ShapeDtypeStruct((batch, num_splits, num_heads), jnp.float32)] * 2
    in_specs = [
        pl.BlockSpec((batch,), lambda b, g, j: (0,)),
        pl.BlockSpec((None, max_pages), lambda b, g, j: (b, 0)),
        pl.BlockSpec((None, num_heads, words, 4), lambda b, g, j: (b, 0, 0, 0)),
        kv_spec, kv_spec, scale_spec, scale_spec,
    ]
    args = [lengths, block_tables, qs, k_words, v_words, k_scale_pages, v_scale_pages]
    aliases = {}
    if append:  # the new key and value of head g of row b, [W, 4] like q; the pages are outputs too
        kv_len, k_new, v_new = new
        new_spec = pl.BlockSpec((None, None, words, 4), lambda b, g, j: (b, g, 0, 0))
        in_specs += [pl.BlockSpec((batch,), lambda b, g, j: (0,)), new_spec, new_spec]
        args += [kv_len, *(x.reshape(batch, num_kv_heads, words, 4) for x in (k_new, v_new))]
        out_specs, out_shape, aliases = with_aliased_outputs(
            out_specs, out_shape, num_splits,
            [(3 + i, spec, args[3 + i]) for i, spec in enumerate((kv_spec, kv_spec, scale_spec, scale_spec))])
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=_triton.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        name="jllm_paged_attention_int8_fma_append" if append else "jllm_paged_attention_int8_fma",
    )(*args)
    pages = ()
    if append:
        out, (k_words, v_words, k_scale_pages, v_scale_pages) = split_aliased_outputs(out, num_splits, 4)
        pages = (*(lax.bitcast_convert_type(w, jnp.int8).reshape(k_pages.shape) for w in (k_words, v_words)),
                 k_scale_pages, v_scale_pages)
    if num_splits == 1:
        o = out.reshape(batch, num_heads, head_dim)
    else:
        o = merge_splits(out[0].reshape(batch, num_splits, num_heads, head_dim), out[1], out[2], group=1,
                         dtype=q.dtype, interpret=interpret)
    return (o, *pages) if append else o
