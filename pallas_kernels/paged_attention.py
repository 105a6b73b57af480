"""Paged attention in Pallas, Triton backend: one query per row (decode) or several (chunked
prefill), plus jit-able page management.

The pool keeps the model's per-token layout: k_pages, v_pages [P, page_size, G, K], so token slot
i of page p holds the [G, K] keys of every KV head, exactly like one position of the static cache
[B, S, G, K]. A decode step then writes one contiguous [G, K] slab per row (`append`), and the
kernel reads, per KV head, rows of K contiguous elements, the same access pattern as the static
decode kernel. block_tables [B, max_pages] maps a row's logical page to a pool page (-1 = none).

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
dequantizes in registers exactly as the decode kernel does (`online_softmax_step`).
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
# The page management section calls kv_quant's functions as dec.quantize_kv / dec.dequantize_kv.
from pallas_kernels import kv_quant as dec
from pallas_kernels.kv_quant import dequantize_kv
from pallas_kernels.split_k import (
    LOG2_E, MASK_VALUE, BlockSizes, check_kv_dtypes, check_shapes, init_carry, merge_splits,
    online_softmax_step, resolve_splits, split_outputs, split_range, store_result,
)

__all__ = [
    "BlockSizes", "PagePool", "paged_attention", "paged_attention_ref", "paged_attention_mq",
    "paged_attention_mq_ref", "init_pages", "allocate", "append", "extend", "release", "gather",
]


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
    out = _paged_call(
        q[:, None], k_pages, v_pages, block_tables.astype(jnp.int32), lengths, lengths - 1,
        jnp.ones_like(lengths), k_scale_pages, v_scale_pages, block_sizes or BlockSizes(), interpret,
    )
    return out[:, 0]


def _gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """pages [P, page_size, G, K], tables [B, max_pages] -> [B, max_pages * page_size, G, K]."""
    batch, max_pages = block_tables.shape
    _, page_size, num_kv_heads, head_dim = pages.shape
    rows = pages[jnp.maximum(block_tables, 0)]  # [B, max_pages, page_size, G, K]
    return rows.reshape(batch, max_pages * page_size, num_kv_heads, head_dim)


def _gather_scale_pages(scale_pages: jax.Array, block_tables: jax.Array) -> jax.Array:
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
    k = _gather_pages(k_pages, block_tables).astype(jnp.float32)  # [B, S, G, K], S = max_pages * page_size
    v = _gather_pages(v_pages, block_tables).astype(jnp.float32)
    if k_scale_pages is not None:
        k = dequantize_kv(k, _gather_scale_pages(k_scale_pages, block_tables), jnp.float32)
        v = dequantize_kv(v, _gather_scale_pages(v_scale_pages, block_tables), jnp.float32)
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


# ----------------------------------------------------------------------------------------------
# Page management: pure functions over a PagePool pytree, jit-able, no host sync.


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "k_pages", "v_pages", "free", "block_tables", "lengths", "k_scale_pages", "v_scale_pages"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PagePool:
    """One layer's page pool and the per-row bookkeeping.

    k_pages, v_pages [P, page_size, G, K]; free [P] bool (True = unused); block_tables
    [B, max_pages] int32 (-1 = no page); lengths [B] int32 tokens stored per row. An int8 pool
    also holds k_scale_pages, v_scale_pages [P, G, page_size] float32 (None for a float pool).
    """
    k_pages: jax.Array
    v_pages: jax.Array
    free: jax.Array
    block_tables: jax.Array
    lengths: jax.Array
    k_scale_pages: jax.Array | None = None
    v_scale_pages: jax.Array | None = None

    @property
    def page_size(self) -> int:
        return self.k_pages.shape[1]

    @property
    def num_pages(self) -> int:
        return self.k_pages.shape[0]


def init_pages(
    num_pages: int,
    page_size: int,
    batch: int,
    max_pages_per_row: int,
    num_kv_heads: int,
    head_dim: int,
    dtype=jnp.bfloat16,
) -> PagePool:
    """An empty pool: all pages free, no row owns a page, all lengths 0.

    dtype int8 makes an int8 pool: int8 pages plus float32 scale pages [P, G, page_size];
    append/extend then quantize what they write (quantize_kv).
    """
    if jnp.issubdtype(dtype, jnp.integer) and jnp.dtype(dtype) != jnp.int8:
        raise TypeError(f"a pool holds floats or int8 (with scales); got dtype={jnp.dtype(dtype)}")
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    int8 = jnp.dtype(dtype) == jnp.int8
    scales = [jnp.zeros((num_pages, num_kv_heads, page_size), jnp.float32) if int8 else None
              for _ in range(2)]  # two buffers: a donated pool must not hold one array twice
    return PagePool(
        k_pages=jnp.zeros(shape, dtype),
        v_pages=jnp.zeros(shape, dtype),
        free=jnp.ones((num_pages,), bool),
        block_tables=jnp.full((batch, max_pages_per_row), -1, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
        k_scale_pages=scales[0],
        v_scale_pages=scales[1],
    )


def _take_free(free: jax.Array, need: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Gives the k-th needing slot the k-th free page (lowest ids first).

    free [P] bool, need [N] bool -> (free [P] with those pages taken, page [N] int32; -1 where
    nothing was needed or the pool ran dry).
    """
    num_pages = free.shape[0]
    candidates = jnp.nonzero(free, size=need.shape[0], fill_value=num_pages)[0]  # [N]
    rank = jnp.clip(jnp.cumsum(need) - 1, 0, need.shape[0] - 1)
    page = jnp.where(need, candidates[rank], num_pages)  # [N]
    free = free.at[page].set(False, mode="drop")  # index P (none / dry) is dropped
    return free, jnp.where(page < num_pages, page, -1).astype(jnp.int32)


def allocate(pool: PagePool, row: jax.Array | int, num_tokens: jax.Array | int) -> PagePool:
    """Reserves pages so that `row` can hold num_tokens tokens; pages it already owns are kept.

    If the pool runs dry the missing slots stay -1: check `pool.free.sum()` on the host first.
    """
    max_pages = pool.block_tables.shape[1]
    table = pool.block_tables[row]  # [max_pages]
    need = (jnp.arange(max_pages) < pl.cdiv(num_tokens, pool.page_size)) & (table < 0)
    free, page = _take_free(pool.free, need)
    table = jnp.where(need, page, table)
    return dataclasses.replace(pool, free=free, block_tables=pool.block_tables.at[row].set(table))


def _store(pool: PagePool, target: jax.Array, offset: jax.Array, k: jax.Array, v: jax.Array) -> dict:
    """The page fields of `pool` with k, v [N, G, K] written at (page target[N], slot offset[N]);
    target P is dropped. An int8 pool stores quantize_kv's codes and their scales."""
    if pool.k_scale_pages is None:
        return dict(
            k_pages=pool.k_pages.at[target, offset].set(k.astype(pool.k_pages.dtype), mode="drop"),
            v_pages=pool.v_pages.at[target, offset].set(v.astype(pool.v_pages.dtype), mode="drop"),
        )
    if not (jnp.issubdtype(k.dtype, jnp.floating) and jnp.issubdtype(v.dtype, jnp.floating)):
        raise TypeError(f"an int8 pool quantizes float k, v itself; got {k.dtype=} {v.dtype=}")
    fields = {}
    for name, x, pages, scale_pages in (("k", k, pool.k_pages, pool.k_scale_pages),
                                        ("v", v, pool.v_pages, pool.v_scale_pages)):
        codes, scale = dec.quantize_kv(x[None])  # [1, N, G, K] int8, [1, G, N] float32
        fields[f"{name}_pages"] = pages.at[target, offset].set(codes[0], mode="drop")
        # Advanced indices around a slice: the indexed view is [N, G].
        fields[f"{name}_scale_pages"] = scale_pages.at[target, :, offset].set(scale[0].T, mode="drop")
    return fields


def append(pool: PagePool, k: jax.Array, v: jax.Array) -> PagePool:
    """Writes one token's k, v [B, G, K] for every row at its length, allocating a page for rows
    that cross a page boundary, and advances every length by one (int8 pool: k, v quantized)."""
    batch, max_pages = pool.block_tables.shape
    rows = jnp.arange(batch)
    pos = pool.lengths  # [B]
    logical = pos // pool.page_size  # [B]
    page = pool.block_tables[rows, jnp.minimum(logical, max_pages - 1)]  # [B]
    need = (page < 0) & (logical < max_pages)
    free, new_page = _take_free(pool.free, need)
    page = jnp.where(need, new_page, page)
    tables = pool.block_tables.at[rows, logical].set(page, mode="drop")  # logical >= max_pages: dropped
    target = jnp.where((page >= 0) & (logical < max_pages), page, pool.num_pages)  # [B]; P = drop
    offset = pos % pool.page_size
    return PagePool(
        **_store(pool, target, offset, k, v),
        free=free,
        block_tables=tables,
        lengths=pos + 1,
    )


def extend(pool: PagePool, row: jax.Array | int, k: jax.Array, v: jax.Array) -> PagePool:
    """Writes a chunk k, v [T, G, K] of one row at its length (a prefill), allocating pages
    (int8 pool: k, v quantized)."""
    num_tokens = k.shape[0]
    start = pool.lengths[row]
    pool = allocate(pool, row, start + num_tokens)
    pos = start + jnp.arange(num_tokens)  # [T]
    max_pages = pool.block_tables.shape[1]
    page = pool.block_tables[row, jnp.minimum(pos // pool.page_size, max_pages - 1)]  # [T]
    target = jnp.where((page >= 0) & (pos < max_pages * pool.page_size), page, pool.num_pages)
    offset = pos % pool.page_size
    return dataclasses.replace(
        pool,
        **_store(pool, target, offset, k, v),
        lengths=pool.lengths.at[row].add(num_tokens),
    )


def release(pool: PagePool, row: jax.Array | int) -> PagePool:
    """Returns a row's pages to the pool and empties the row."""
    table = pool.block_tables[row]  # [max_pages]
    free = pool.free.at[jnp.where(table >= 0, table, pool.num_pages)].set(True, mode="drop")
    return dataclasses.replace(
        pool,
        free=free,
        block_tables=pool.block_tables.at[row].set(-1),
        lengths=pool.lengths.at[row].set(0),
    )


def gather(pool: PagePool) -> tuple[jax.Array, jax.Array]:
    """Every row's KV as a contiguous cache: k, v [B, max_pages * page_size, G, K], zeros past length.

    An int8 pool gives the values attention sees, dequantized in float32 (codes * scales, as
    decode_attention_ref does), so the result is always a float cache for the float refs.
    """
    k = _gather_pages(pool.k_pages, pool.block_tables)
    v = _gather_pages(pool.v_pages, pool.block_tables)
    if pool.k_scale_pages is not None:
        k = dec.dequantize_kv(k, _gather_scale_pages(pool.k_scale_pages, pool.block_tables), jnp.float32)
        v = dec.dequantize_kv(v, _gather_scale_pages(pool.v_scale_pages, pool.block_tables), jnp.float32)
    keep = jnp.arange(k.shape[1])[None, :] < pool.lengths[:, None]  # [B, S]
    return jnp.where(keep[..., None, None], k, 0), jnp.where(keep[..., None, None], v, 0)
