"""Paged attention in Pallas, Triton backend: one query per row (decode) or several (chunked
prefill) over keys in a pool of pages.

The pool keeps the model's per-token layout: k_pages, v_pages [P, page_size, G, K], so token slot
i of page p holds the [G, K] keys of every KV head, exactly like one position of the static cache
[B, S, G, K]. A decode step then writes one contiguous [G, K] slab per row, and the kernel reads,
per KV head, rows of K contiguous elements, the same access pattern as the static decode kernel.
block_tables [B, max_pages] maps a row's logical page to a pool page (-1 = none). Writing the
pages and managing the table are the caller's (jllm.kvcache).

`paged_attention_mq`: q [B, T, H, K], query t of row b at position q_start[b] + t, sees keys
s < lengths[b] with s <= q_start[b] + t; queries t >= n_queries[b] are padding (zeros out). The
grid is (B, G, ceil(T / block_q), num_splits): a program owns block_q query tokens times the R
query heads of KV head g (the M side of the dot, rows = block_q x R padded to >= 16) and one
split of the keys its queries see, walking key blocks only up to the tile's last visible position.
Blocks every query of the tile sees in full run without mask arithmetic; the rest (the causal
diagonal, the row's end) are masked per query and key. The rows of a key block are gathered
through the block table (one table lookup per key, served from L1), so block_k is independent of
page_size and a block may span several pages. Split-K and its merge are `split_k`'s.
`paged_attention` (q [B, H, K], decode) is the case T = 1 at q_start = lengths - 1.

int8 pages: k_pages, v_pages may be int8 with float32 k_scale_pages, v_scale_pages
[P, G, page_size] (key in slot i of page p, head g = k_pages[p, i, g] * k_scale_pages[p, g, i]).
That is the static int8 cache's [B, G, S] with B -> P and S -> page_size, so
`quantize_kv(pages)` returns the scale pages as they are stored, and one page's scales of a head
are contiguous. The kernel gathers each key's scale through the same table entry as its row and
dequantizes in registers exactly as the decode kernel does (`online_softmax_step`). With one query
head per KV head (R = 1: Llama-2-7B and 13B), `paged_attention` runs int8 pages through
`paged_int8_fma` instead: register FMAs over the codes' bytes, no tensor-core dots (379.8
against 495.5 us for 256 rows of 544 keys on an H200; docs/PERFORMANCE.md, sixth round).
`paged_attention_append` is that path with the decode step's cache write inside the kernel: the
new key and value are rounded to int8 and stored there, so a step runs no XLA quantize or scatter.
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
from pallas_kernels.paged_int8_fma import paged_int8_fma
from pallas_kernels.split_k import (
    LOG2_E, MASK_VALUE, BlockSizes, check_kv_dtypes, check_shapes, init_carry, merge_splits,
    online_softmax_step, resolve_splits, split_outputs, split_range, store_result,
)

__all__ = ["BlockSizes", "paged_attention", "paged_attention_append", "paged_attention_ref", "paged_attention_mq", "paged_attention_mq_ref",
           "gather_pages", "gather_scale_pages"]


def _paged_kernel(
    lengths_ref,  # [B] int32
    q_start_ref,  # [B] int32
    n_queries_ref,  # [B] int32
    tables_ref,  # [max_pages] int32, block table of row b
    q_ref,  # [T, H, K] every query of row b
    k_ref,  # [P * page_size, K] kv head g of every pool slot
    v_ref,  # [P * page_size, K]
    *refs,  # [ks_ref, vs_ref [P, page_size] float32 scales of kv head g, int8 pages only], o_ref, [m_ref, l_ref]
    quantized: bool,
    page_size: int,
    group: int,
    heads: int,
    block_q: int,
    block_k: int,
    num_splits: int,
    scale: float,
):
    """Attention of block_q queries x the R heads of KV head g of row b over the keys of split j.

    o_ref [T, H, K] is the q.dtype output (num_splits == 1) or the float32 partial of split j, then
    m_ref, l_ref [T, H] float32 when num_splits > 1. A tile holds `heads` >= R head slots (padding
    past R keeps the dot's M side >= 16), so row = token * heads + head.
    """
    scale_refs, (o_ref, *ml_refs) = (refs[:2], refs[2:]) if quantized else ((), refs)
    b, g, i, j = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    num_tokens, _, head_dim = q_ref.shape
    rows = block_q * heads
    length = jnp.minimum(lengths_ref[b], tables_ref.shape[0] * page_size)  # never past the table
    q_start = q_start_ref[b]
    n_queries = jnp.minimum(n_queries_ref[b], num_tokens)
    t0 = i * block_q
    # Keys [0, end) are seen by some real query of the tile, [0, full_end) by all of them.
    end = jnp.where(t0 < n_queries, jnp.clip(q_start + jnp.minimum(t0 + block_q, n_queries), 0, length), 0)
    full_end = jnp.clip(q_start + t0 + 1, 0, end)
    lo, hi = split_range(end, block_k, num_splits, j)
    num_full = full_end // block_k
    head = g * group
    token = t0 + jnp.arange(block_q)  # [block_q]
    in_bounds = (token[:, None] < num_tokens) & (jnp.arange(heads)[None, :] < group)  # [block_q, heads]
    real = (in_bounds & (token[:, None] < n_queries)).reshape(rows)  # [rows]: not padding
    tile = (pl.ds(t0, block_q), pl.ds(head, heads))
    q = plgpu.load(q_ref.at[(*tile, slice(None))], mask=real.reshape(block_q, heads)[..., None], other=0.0)
    q = q.reshape(rows, head_dim)  # [rows, K]
    row_pos = q_start + t0 + jnp.arange(rows) // heads  # [rows] absolute query positions
    qk_scale = scale * LOG2_E

    def body(blk, carry, *, masked: bool):
        key = blk * block_k + jnp.arange(block_k)  # [block_k] logical positions
        key_ok = key < end if masked else None
        mask = {} if key_ok is None else dict(mask=key_ok, other=0)
        page = plgpu.load(tables_ref.at[key // page_size], **mask)  # [block_k]
        page = jnp.maximum(page, 0)  # a -1 entry (no page) never reads outside the pool
        slot = page * page_size + key % page_size  # [block_k] pool rows
        # Both axes as index arrays: one gather pointer tensor, contiguous along K.
        idx = (slot[:, None], jnp.arange(head_dim)[None, :])  # [block_k, 1], [1, K]
        kv_mask = {} if key_ok is None else dict(mask=key_ok[:, None], other=0.0)
        k = plgpu.load(k_ref.at[idx], **kv_mask)  # [block_k, K]
        v = plgpu.load(v_ref.at[idx], **kv_mask)  # [block_k, K]
        visible = None if not masked else (key[None, :] <= row_pos[:, None]) & key_ok[None, :]  # [rows, block_k]
        if not quantized:
            return online_softmax_step(q, k, v, visible, carry, qk_scale)
        # A key's scales sit in the same page as its codes: (page, slot in page) of head g's [P, page_size].
        ks_ref, vs_ref = scale_refs
        scale_idx = (page, key % page_size)  # [block_k], [block_k]
        scale_mask = {} if key_ok is None else dict(mask=key_ok, other=0.0)
        ks = plgpu.load(ks_ref.at[scale_idx], **scale_mask)  # [block_k] f32
        vs = plgpu.load(vs_ref.at[scale_idx], **scale_mask)  # [block_k] f32
        return online_softmax_step(q, k, v, visible, carry, qk_scale, k_scale=ks, v_scale=vs)

    carry = init_carry(rows, head_dim)
    carry = lax.fori_loop(lo, jnp.minimum(hi, num_full), functools.partial(body, masked=False), carry)
    acc, m, l = lax.fori_loop(jnp.maximum(lo, num_full), hi, functools.partial(body, masked=True), carry)
    # Padding rows, and rows that saw no key (m still MASK_VALUE), leave zeros (and weight 0 in the merge).
    keep = real & (m > MASK_VALUE)
    acc, l, m = jnp.where(keep[:, None], acc, 0.0), jnp.where(keep, l, 0.0), jnp.where(keep, m, MASK_VALUE)
    store_result(o_ref, tuple(ml_refs), tile, in_bounds, acc, m, l)


def _paged_call(
    q: jax.Array,  # [B, T, H, K]
    k_pages: jax.Array,  # [P, page_size, G, K]
    v_pages: jax.Array,  # [P, page_size, G, K]
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32
    q_start: jax.Array,  # [B] int32
    n_queries: jax.Array,  # [B] int32
    k_scale_pages: jax.Array | None,  # [P, G, page_size] float32, int8 pages only
    v_scale_pages: jax.Array | None,  # [P, G, page_size] float32, int8 pages only
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:  # [B, T, H, K]
    batch, num_tokens, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    max_len = max_pages * page_size
    group = num_heads // num_kv_heads
    quantized = k_scale_pages is not None
    block_k = min(block_sizes.block_k, max(16, pl.next_power_of_2(max_len)))
    group_pow2 = pl.next_power_of_2(group)
    block_q = block_sizes.block_q or max(1, 64 // group_pow2)  # about 64 rows
    block_q = min(block_q, pl.next_power_of_2(num_tokens))
    heads = max(group_pow2, 16 // block_q)  # rows = block_q * heads >= 16 for the dot
    num_q_blocks = pl.cdiv(num_tokens, block_q)
    num_splits = resolve_splits(
        dataclasses.replace(block_sizes, block_k=block_k), batch * num_kv_heads * num_q_blocks, max_len,
        programs_per_sm=2,
    )
    kernel = functools.partial(
        _paged_kernel,
        quantized=quantized,
        page_size=page_size,
        group=group,
        heads=heads,
        block_q=block_q,
        block_k=block_k,
        num_splits=num_splits,
        scale=1.0 / math.sqrt(head_dim),
    )
    pool_rows = num_pages * page_size
    k_flat = k_pages.reshape(pool_rows, num_kv_heads, head_dim)  # [P * page_size, G, K], free reshape
    v_flat = v_pages.reshape(pool_rows, num_kv_heads, head_dim)
    kv_spec = pl.BlockSpec((pool_rows, None, head_dim), lambda b, g, i, j: (0, g, 0))
    out_specs, out_shape = split_outputs(batch, num_splits, (num_tokens, num_heads), head_dim, q.dtype)
    scalar_spec = pl.BlockSpec((batch,), lambda b, g, i, j: (0,))
    in_specs = [
        scalar_spec,
        scalar_spec,
        scalar_spec,
        pl.BlockSpec((None, max_pages), lambda b, g, i, j: (b, 0)),
        pl.BlockSpec((None, num_tokens, num_heads, head_dim), lambda b, g, i, j: (b, 0, 0, 0)),
        kv_spec,
        kv_spec,
    ]
    args = [lengths, q_start, n_queries, block_tables, q, k_flat, v_flat]
    if quantized:  # the scales of KV head g in every page: [P, page_size], rows at a stride of G * page_size
        scale_spec = pl.BlockSpec((num_pages, None, page_size), lambda b, g, i, j: (0, g, 0))
        in_specs += [scale_spec, scale_spec]
        args += [k_scale_pages, v_scale_pages]
    name = "jllm_paged_attention" + ("_mq" if num_tokens > 1 else "") + ("_int8" if quantized else "")
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_q_blocks, num_splits),
        in_specs=in_specs,
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_triton.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
    if num_splits == 1:
        return out
    return merge_splits(*out, group=group, dtype=q.dtype, interpret=interpret)


def _check_args(q, k_pages, v_pages, block_tables, k_scale_pages, v_scale_pages, per_row: dict,
                layout: str) -> None:
    """Shapes and dtypes at the public boundary: q in `layout`, the pages, the table and the [B] vectors."""
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected k_pages = v_pages [P, page_size, G, K]; got {k_pages.shape=} {v_pages.shape=}")
    check_shapes(q, k_pages.shape[2], k_pages.shape[3], layout)
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"expected block_tables [B, max_pages]; got {block_tables.shape=} {q.shape=}")
    for name, x in per_row.items():
        if x.shape != (q.shape[0],):
            raise ValueError(f"expected {name} [B] = ({q.shape[0]},); got {name}.shape={x.shape}")
    check_kv_dtypes(k_pages, v_pages, k_scale_pages, v_scale_pages,
                    names=("k_pages", "v_pages", "k_scale_pages", "v_scale_pages"),
                    what="int8 pages", dims=("P", "page_size"))


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def paged_attention_mq(
    q: jax.Array,  # [B, T, H, K]
    k_pages: jax.Array,  # [P, page_size, G, K], int8 with k_scale_pages
    v_pages: jax.Array,  # [P, page_size, G, K], int8 with v_scale_pages
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32: keys s < lengths[b] exist
    q_start: jax.Array,  # [B] int32: query t of row b sits at position q_start[b] + t
    n_queries: jax.Array,  # [B] int32: queries t < n_queries[b] are real, the rest padding
    *,
    k_scale_pages: jax.Array | None = None,  # [P, G, page_size] float32
    v_scale_pages: jax.Array | None = None,  # [P, G, page_size] float32
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of T queries per row over paged keys -> [B, T, H, K] in q.dtype.

    Query t sees key s iff s < lengths[b] and s <= q_start[b] + t. Padding queries (t >=
    n_queries[b]) and queries that see no key come back as zeros. A chunk of n new tokens after c
    cached ones is q_start = c, n_queries = n, lengths = c + n (the chunk written to the pool first).
    """
    _check_args(q, k_pages, v_pages, block_tables, k_scale_pages, v_scale_pages,
                dict(lengths=lengths, q_start=q_start, n_queries=n_queries), "[B, T, H, K]")
    return _paged_call(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
        q_start.astype(jnp.int32), n_queries.astype(jnp.int32), k_scale_pages, v_scale_pages,
        block_sizes or BlockSizes(), interpret,
    )


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def paged_attention(
    q: jax.Array,  # [B, H, K]
    k_pages: jax.Array,  # [P, page_size, G, K], int8 with k_scale_pages
    v_pages: jax.Array,  # [P, page_size, G, K], int8 with v_scale_pages
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32, >= 1
    *,
    k_scale_pages: jax.Array | None = None,  # [P, G, page_size] float32
    v_scale_pages: jax.Array | None = None,  # [P, G, page_size] float32
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """One query per row over its first lengths[b] paged keys -> [B, H, K] in q.dtype
    (paged_attention_mq with T = 1 at position lengths[b] - 1)."""
    _check_args(q, k_pages, v_pages, block_tables, k_scale_pages, v_scale_pages, dict(lengths=lengths),
                "[B, H, K]")
    lengths = lengths.astype(jnp.int32)
    quantized = k_scale_pages is not None
    fma = quantized and q.shape[1] == k_pages.shape[2] and (block_sizes is None or block_sizes.fma is not False)
    block_sizes = block_sizes or decode_block_sizes(q.shape[0] * k_pages.shape[2], quantized, fma)
    if fma:
        return paged_int8_fma(q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths, k_scale_pages,
                              v_scale_pages, block_sizes, interpret)
    out = _paged_call(
        q[:, None], k_pages, v_pages, block_tables.astype(jnp.int32), lengths, lengths - 1,
        jnp.ones_like(lengths), k_scale_pages, v_scale_pages, block_sizes, interpret,
    )
    return out[:, 0]


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def paged_attention_append(
    q: jax.Array,  # [B, H, K], H = G
    k_pages: jax.Array,  # [P, page_size, G, K] int8
    v_pages: jax.Array,  # [P, page_size, G, K] int8
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32 keys already stored
    kv_len: jax.Array,  # [B] int32: the new key is visible where kv_len[b] > lengths[b]
    k_new: jax.Array,  # [B, G, K] after RoPE
    v_new: jax.Array,  # [B, G, K]
    *,
    k_scale_pages: jax.Array,  # [P, G, page_size] float32
    v_scale_pages: jax.Array,  # [P, G, page_size] float32
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array]:
    """A decode step over int8 pages with one query head per KV head (R = 1) and the cache write
    in the kernel: k_new, v_new are rounded to int8 codes and scales as `quantize_kv` rounds them,
    stored at slot lengths[b] of row b's pages (dropped where that slot's page is not in the
    table) and attended with the lengths[b] keys before them -> (out [B, H, K], k_pages, v_pages,
    k_scale_pages, v_scale_pages), the pages updated in place where the caller donates them."""
    _check_args(q, k_pages, v_pages, block_tables, k_scale_pages, v_scale_pages,
                dict(lengths=lengths, kv_len=kv_len), "[B, H, K]")
    if k_scale_pages is None or q.shape[1] != k_pages.shape[2]:
        raise ValueError(f"paged_attention_append takes int8 pages with one query head per KV head; got "
                         f"{k_pages.dtype} pages, {q.shape[1]} query heads over {k_pages.shape[2]} KV heads")
    want = (q.shape[0], k_pages.shape[2], k_pages.shape[3])
    if k_new.shape != want or v_new.shape != want:
        raise ValueError(f"expected k_new = v_new [B, G, K] = {want}; got {k_new.shape=} {v_new.shape=}")
    if block_sizes is not None and block_sizes.fma is False:
        raise ValueError("paged_attention_append runs the FMA path only; got BlockSizes(fma=False)")
    block_sizes = block_sizes or decode_block_sizes(q.shape[0] * k_pages.shape[2], True, True)
    return paged_int8_fma(q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
                          k_scale_pages, v_scale_pages, block_sizes, interpret,
                          new=(kv_len.astype(jnp.int32), k_new, v_new))


def decode_block_sizes(programs: int, quantized: bool = False, fma: bool = False) -> BlockSizes:
    """The default tiling of `paged_attention` over `programs` (row, KV head) pairs. With at least
    two per SM there are no length splits, and 2 pipeline stages beat 4: 550.5 against 568.4 us
    for 256 rows of 544 keys (7B, pages of 16) on an H200, an engine decode step of 25.13 against
    25.61 ms. int8 pages (quantized) on the dot path then take 128 keys per step: 496.1 against
    525.1 us, the fastest of 24 tilings (docs/PERFORMANCE.md, 2026-12-04, fifth round). The FMA
    path (fma: int8 pages, R = 1) takes 4 warps: its registers grow with block_k and warps (at 256
    x 544: 64 keys 379.8 us, 128 keys 448-457, 8 warps 431.3; sixth round). With two programs per
    SM it takes 32 keys a step and a running max per key slot (row_max): 366.6 against 379.0 us
    for 64 keys and one max (seventh round); below that, 64 keys and one max."""
    many = programs >= 2 * getattr(jax.devices()[0], "core_count", 132)
    if fma:
        return BlockSizes(block_k=32, num_stages=1, row_max=True) if many else BlockSizes(num_stages=1)
    if not many:
        return BlockSizes()
    return BlockSizes(block_k=128, num_stages=2) if quantized else BlockSizes(num_stages=2)


def gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """pages [P, page_size, G, K], tables [B, max_pages] -> [B, max_pages * page_size, G, K]."""
    batch, max_pages = block_tables.shape
    _, page_size, num_kv_heads, head_dim = pages.shape
    rows = pages[jnp.maximum(block_tables, 0)]  # [B, max_pages, page_size, G, K]
    return rows.reshape(batch, max_pages * page_size, num_kv_heads, head_dim)


def gather_scale_pages(scale_pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """scale_pages [P, G, page_size], tables [B, max_pages] -> [B, G, max_pages * page_size]."""
    batch, max_pages = block_tables.shape
    _, num_kv_heads, page_size = scale_pages.shape
    rows = scale_pages[jnp.maximum(block_tables, 0)]  # [B, max_pages, G, page_size]
    return rows.transpose(0, 2, 1, 3).reshape(batch, num_kv_heads, max_pages * page_size)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def paged_attention_mq_ref(
    q: jax.Array,  # [B, T, H, K]
    k_pages: jax.Array,  # [P, page_size, G, K], int8 with k_scale_pages
    v_pages: jax.Array,  # [P, page_size, G, K], int8 with v_scale_pages
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32
    q_start: jax.Array,  # [B] int32
    n_queries: jax.Array,  # [B] int32
    *,
    k_scale_pages: jax.Array | None = None,  # [P, G, page_size] float32
    v_scale_pages: jax.Array | None = None,  # [P, G, page_size] float32
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pure-jnp float32 twin of paged_attention_mq: gather the pages (and scales), then masked
    softmax attention -> [B, T, H, K] in q.dtype, zeros for padding queries and queries that see no key."""
    del block_sizes, interpret
    _check_args(q, k_pages, v_pages, block_tables, k_scale_pages, v_scale_pages,
                dict(lengths=lengths, q_start=q_start, n_queries=n_queries), "[B, T, H, K]")
    k = gather_pages(k_pages, block_tables).astype(jnp.float32)  # [B, S, G, K], S = max_pages * page_size
    v = gather_pages(v_pages, block_tables).astype(jnp.float32)
    if k_scale_pages is not None:
        k = dequantize_kv(k, gather_scale_pages(k_scale_pages, block_tables), jnp.float32)
        v = dequantize_kv(v, gather_scale_pages(v_scale_pages, block_tables), jnp.float32)
    batch, num_tokens, num_heads, head_dim = q.shape
    seq_len, num_kv_heads = k.shape[1], k.shape[2]
    key = jnp.arange(seq_len)  # [S]
    exists = key[None, :] < lengths[:, None]  # [B, S]
    k = jnp.where(exists[..., None, None], k, 0.0)  # whatever lies past a row's length is never used
    v = jnp.where(exists[..., None, None], v, 0.0)
    pos = q_start[:, None] + jnp.arange(num_tokens)[None, :]  # [B, T]
    visible = (key[None, None, :] <= pos[:, :, None]) & exists[:, None, :]  # [B, T, S]
    qf = q.astype(jnp.float32).reshape(batch, num_tokens, num_kv_heads, num_heads // num_kv_heads, head_dim)
    logits = jnp.einsum("btgrk,bsgk->bgrts", qf, k) / math.sqrt(head_dim)  # [B, G, R, T, S]
    logits = jnp.where(visible[:, None, None], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v)  # [B, T, G, R, K]
    real = (jnp.arange(num_tokens)[None, :] < n_queries[:, None]) & visible.any(axis=-1)  # [B, T]
    out = jnp.where(real[:, :, None, None, None], out, 0.0)
    return out.reshape(q.shape).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def paged_attention_ref(
    q: jax.Array,  # [B, H, K]
    k_pages: jax.Array,  # [P, page_size, G, K], int8 with k_scale_pages
    v_pages: jax.Array,  # [P, page_size, G, K], int8 with v_scale_pages
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32
    *,
    k_scale_pages: jax.Array | None = None,  # [P, G, page_size] float32
    v_scale_pages: jax.Array | None = None,  # [P, G, page_size] float32
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pure-jnp float32 twin of paged_attention -> [B, H, K] in q.dtype."""
    del block_sizes, interpret
    _check_args(q, k_pages, v_pages, block_tables, k_scale_pages, v_scale_pages, dict(lengths=lengths),
                "[B, H, K]")
    out = paged_attention_mq_ref(q[:, None], k_pages, v_pages, block_tables, lengths, lengths - 1,
                                 jnp.ones_like(lengths), k_scale_pages=k_scale_pages, v_scale_pages=v_scale_pages)
    return out[:, 0]
