"""Decode attention over a paged KV cache in Pallas, Triton backend, plus jit-able page management.

The pool keeps the model's per-token layout: k_pages, v_pages [P, page_size, G, K], so token slot
i of page p holds the [G, K] keys of every KV head, exactly like one position of the static cache
[B, S, G, K]. A decode step then writes one contiguous [G, K] slab per row (`append`), and the
kernel reads, per KV head, rows of K contiguous elements, the same access pattern as the static
decode kernel. block_tables [B, max_pages] maps a row's logical page to a pool page (-1 = none).

The kernel is the decode kernel's split-K grid (B, G, num_splits) with one change: the rows of a
key block are gathered through the block table (one table lookup per key, served from L1), so
block_k is independent of page_size and a block may span several pages.
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
from pallas_kernels import decode_attention as dec
from pallas_kernels.decode_attention import BlockSizes

__all__ = [
    "BlockSizes", "PagePool", "paged_attention", "paged_attention_ref",
    "init_pages", "allocate", "append", "extend", "release", "gather",
]


def _paged_kernel(
    lengths_ref,  # [B] int32
    tables_ref,  # [max_pages] int32, block table of row b
    q_ref,  # [H, K] all query heads of row b
    k_ref,  # [P * page_size, K] kv head g of every pool slot
    v_ref,  # [P * page_size, K]
    o_ref,  # [H, K]: q.dtype output (num_splits == 1) or float32 partial of split j
    *ml_refs,  # m_ref, l_ref [H] float32, only when num_splits > 1
    page_size: int,
    group: int,
    rows: int,
    block_k: int,
    num_splits: int,
    scale: float,
):
    """Attention of the R heads of KV head g of row b over the keys of split j, through the table."""
    b, g, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    head_dim = k_ref.shape[-1]
    length = jnp.minimum(lengths_ref[b], tables_ref.shape[0] * page_size)  # never past the table
    lo, hi = dec.split_range(length, block_k, num_splits, j)
    head = g * group
    row_ok = jnp.arange(rows) < group  # [rows]
    q = plgpu.load(q_ref.at[pl.ds(head, rows), :], mask=row_ok[:, None], other=0.0)  # [rows, K]
    qk_scale = scale * dec._LOG2_E

    def body(i, carry):
        token = i * block_k + jnp.arange(block_k)  # [block_k] logical positions
        key_ok = token < length
        page = plgpu.load(tables_ref.at[token // page_size], mask=key_ok, other=0)  # [block_k]
        slot = jnp.maximum(page, 0) * page_size + token % page_size  # [block_k] pool rows
        # Both axes as index arrays: one gather pointer tensor, contiguous along K.
        idx = (slot[:, None], jnp.arange(head_dim)[None, :])  # [block_k, 1], [1, K]
        k = plgpu.load(k_ref.at[idx], mask=key_ok[:, None], other=0.0)  # [block_k, K]
        v = plgpu.load(v_ref.at[idx], mask=key_ok[:, None], other=0.0)  # [block_k, K]
        return dec.online_softmax_step(q, k, v, key_ok, carry, qk_scale)

    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), dec._MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    acc, m, l = lax.fori_loop(lo, hi, body, carry)
    dec.store_result(o_ref, ml_refs, head, rows, group, acc, m, l)


def _paged_call(
    q: jax.Array,  # [B, H, K]
    k_pages: jax.Array,  # [P, page_size, G, K]
    v_pages: jax.Array,  # [P, page_size, G, K]
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:  # [B, H, K]
    batch, num_heads, head_dim = q.shape
    num_pages, page_size, num_kv_heads, _ = k_pages.shape
    max_pages = block_tables.shape[1]
    max_len = max_pages * page_size
    group = num_heads // num_kv_heads
    block_k = min(block_sizes.block_k, max(16, pl.next_power_of_2(max_len)))
    num_splits = dec.resolve_splits(
        dataclasses.replace(block_sizes, block_k=block_k), batch, num_kv_heads, max_len, programs_per_sm=2
    )
    kernel = functools.partial(
        _paged_kernel,
        page_size=page_size,
        group=group,
        rows=max(16, pl.next_power_of_2(group)),
        block_k=block_k,
        num_splits=num_splits,
        scale=1.0 / math.sqrt(head_dim),
    )
    pool_rows = num_pages * page_size
    k_flat = k_pages.reshape(pool_rows, num_kv_heads, head_dim)  # [P * page_size, G, K], free reshape
    v_flat = v_pages.reshape(pool_rows, num_kv_heads, head_dim)
    kv_spec = pl.BlockSpec((pool_rows, None, head_dim), lambda b, g, j: (0, g, 0))
    out_specs, out_shape = dec.split_outputs(batch, num_splits, num_heads, head_dim, q.dtype)
    out = pl.pallas_call(
        kernel,
        grid=(batch, num_kv_heads, num_splits),
        in_specs=[
            pl.BlockSpec((batch,), lambda b, g, j: (0,)),
            pl.BlockSpec((None, max_pages), lambda b, g, j: (b, 0)),
            pl.BlockSpec((None, num_heads, head_dim), lambda b, g, j: (b, 0, 0)),
            kv_spec,
            kv_spec,
        ],
        out_specs=out_specs,
        out_shape=out_shape,
        compiler_params=_triton.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        name="jllm_paged_attention",
    )(lengths, block_tables, q, k_flat, v_flat)
    if num_splits == 1:
        return out
    return dec.merge_splits(*out, num_kv_heads=num_kv_heads, dtype=q.dtype, interpret=interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def paged_attention(
    q: jax.Array,  # [B, H, K]
    k_pages: jax.Array,  # [P, page_size, G, K]
    v_pages: jax.Array,  # [P, page_size, G, K]
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32, >= 1
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """One query per row over its first lengths[b] paged keys -> [B, H, K] in q.dtype."""
    if k_pages.ndim != 4 or k_pages.shape != v_pages.shape:
        raise ValueError(f"expected k_pages = v_pages [P, page_size, G, K]; got {k_pages.shape=} {v_pages.shape=}")
    if block_tables.ndim != 2 or block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"expected block_tables [B, max_pages]; got {block_tables.shape=} {q.shape=}")
    dec.check_shapes(q, k_pages.shape[2], k_pages.shape[3])
    return _paged_call(
        q, k_pages, v_pages, block_tables.astype(jnp.int32), lengths.astype(jnp.int32),
        block_sizes or BlockSizes(), interpret,
    )


def _gather_pages(pages: jax.Array, block_tables: jax.Array) -> jax.Array:
    """pages [P, page_size, G, K], tables [B, max_pages] -> [B, max_pages * page_size, G, K]."""
    batch, max_pages = block_tables.shape
    _, page_size, num_kv_heads, head_dim = pages.shape
    rows = pages[jnp.maximum(block_tables, 0)]  # [B, max_pages, page_size, G, K]
    return rows.reshape(batch, max_pages * page_size, num_kv_heads, head_dim)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def paged_attention_ref(
    q: jax.Array,  # [B, H, K]
    k_pages: jax.Array,  # [P, page_size, G, K]
    v_pages: jax.Array,  # [P, page_size, G, K]
    block_tables: jax.Array,  # [B, max_pages] int32
    lengths: jax.Array,  # [B] int32
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pure-jnp float32 twin of paged_attention: gather the pages, then decode_attention_ref."""
    del block_sizes, interpret
    k = _gather_pages(k_pages, block_tables)  # [B, max_pages * page_size, G, K]
    v = _gather_pages(v_pages, block_tables)
    return dec.decode_attention_ref(q, k, v, lengths)


# ----------------------------------------------------------------------------------------------
# Page management: pure functions over a PagePool pytree, jit-able, no host sync.


@functools.partial(jax.tree_util.register_dataclass, data_fields=[
    "k_pages", "v_pages", "free", "block_tables", "lengths"], meta_fields=[])
@dataclasses.dataclass(frozen=True)
class PagePool:
    """One layer's page pool and the per-row bookkeeping.

    k_pages, v_pages [P, page_size, G, K]; free [P] bool (True = unused); block_tables
    [B, max_pages] int32 (-1 = no page); lengths [B] int32 tokens stored per row.
    """
    k_pages: jax.Array
    v_pages: jax.Array
    free: jax.Array
    block_tables: jax.Array
    lengths: jax.Array

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
    """An empty pool: all pages free, no row owns a page, all lengths 0."""
    shape = (num_pages, page_size, num_kv_heads, head_dim)
    return PagePool(
        k_pages=jnp.zeros(shape, dtype),
        v_pages=jnp.zeros(shape, dtype),
        free=jnp.ones((num_pages,), bool),
        block_tables=jnp.full((batch, max_pages_per_row), -1, jnp.int32),
        lengths=jnp.zeros((batch,), jnp.int32),
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


def append(pool: PagePool, k: jax.Array, v: jax.Array) -> PagePool:
    """Writes one token's k, v [B, G, K] for every row at its length, allocating a page for rows
    that cross a page boundary, and advances every length by one."""
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
        k_pages=pool.k_pages.at[target, offset].set(k.astype(pool.k_pages.dtype), mode="drop"),
        v_pages=pool.v_pages.at[target, offset].set(v.astype(pool.v_pages.dtype), mode="drop"),
        free=free,
        block_tables=tables,
        lengths=pos + 1,
    )


def extend(pool: PagePool, row: jax.Array | int, k: jax.Array, v: jax.Array) -> PagePool:
    """Writes a chunk k, v [T, G, K] of one row at its length (a prefill), allocating pages."""
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
        k_pages=pool.k_pages.at[target, offset].set(k.astype(pool.k_pages.dtype), mode="drop"),
        v_pages=pool.v_pages.at[target, offset].set(v.astype(pool.v_pages.dtype), mode="drop"),
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
    """Every row's KV as a contiguous cache: k, v [B, max_pages * page_size, G, K], zeros past length."""
    k = _gather_pages(pool.k_pages, pool.block_tables)
    v = _gather_pages(pool.v_pages, pool.block_tables)
    keep = jnp.arange(k.shape[1])[None, :] < pool.lengths[:, None]  # [B, S]
    return jnp.where(keep[..., None, None], k, 0), jnp.where(keep[..., None, None], v, 0)


# ----------------------------------------------------------------------------------------------
# Benchmark: PYTHONPATH=. python -m pallas_kernels.paged_attention


def _scattered_pool(key, batch, seq_len, kv_heads, head_dim, page_size, dtype):
    """A pool holding `batch` rows of seq_len tokens on randomly permuted pages."""
    pages_per_row = pl.cdiv(seq_len, page_size)
    num_pages = batch * pages_per_row
    kk, kv, kp = jax.random.split(key, 3)
    shape = (num_pages, page_size, kv_heads, head_dim)
    k_pages = jax.random.normal(kk, shape, dtype)
    v_pages = jax.random.normal(kv, shape, dtype)
    tables = jax.random.permutation(kp, num_pages).reshape(batch, pages_per_row).astype(jnp.int32)
    return k_pages, v_pages, tables


def _ragged_check() -> list[str]:
    """GPU correctness on ragged lengths and GQA, pages permuted, against the gathered reference."""
    lines = []
    for i, (heads, kv_heads, page_size, lengths) in enumerate([
        (32, 32, 16, [1, 16, 4096, 1000]), (64, 8, 64, [4095, 1, 129, 2048]),
    ]):
        key = jax.random.key(100 + i)
        q = jax.random.normal(key, (len(lengths), heads, 128), jnp.bfloat16)
        k_pages, v_pages, tables = _scattered_pool(key, len(lengths), 4096, kv_heads, 128, page_size, jnp.bfloat16)
        lengths = jnp.array(lengths, jnp.int32)
        with jax.default_matmul_precision("highest"):
            ref = paged_attention_ref(q, k_pages, v_pages, tables, lengths)
        with _triton.quiet():
            out = paged_attention(q, k_pages, v_pages, tables, lengths)
        lines.append(f"ragged page={page_size} H={heads} G={kv_heads} lengths={lengths.tolist()}: "
                     f"rel err {dec.rel_err(out, ref):.2e}")
    return lines


def main() -> None:
    import sys

    dec.print_header(_ragged_check())
    tune = "--tune" in sys.argv
    rows = []
    tuned = {(1, 4096), (1, 2048)}
    shapes = [(b, s, 32, 32, 128) for b in (1, 8, 64) for s in (512, 2048, 4096)]
    candidates = [
        BlockSizes(block_k=64, num_splits=ns, num_warps=4, num_stages=st)
        for ns, st in [(4, 4), (8, 4), (32, 4), (16, 3)]
    ]
    for page_size in (16, 64):
        for batch, seq_len, heads, kv_heads, head_dim in shapes:
            key = jax.random.key(0)
            q = jax.random.normal(key, (batch, heads, head_dim), jnp.bfloat16)
            lengths = jnp.full((batch,), seq_len, jnp.int32)
            k_pages, v_pages, tables = _scattered_pool(key, batch, seq_len, kv_heads, head_dim, page_size,
                                                       jnp.bfloat16)
            with jax.default_matmul_precision("highest"):
                ref = paged_attention_ref(q, k_pages, v_pages, tables, lengths)
            kv_bytes = 2 * batch * seq_len * kv_heads * head_dim * 2
            sets = []
            for i in range(dec.num_sets(kv_bytes)):
                kp, vp, tb = _scattered_pool(jax.random.key(10 + i), batch, seq_len, kv_heads, head_dim,
                                             page_size, jnp.bfloat16)
                sets.append((q, kp, vp, tb, lengths))
            name = f"page={page_size} B={batch} S={seq_len} H={heads} G={kv_heads}"
            configs = [None] + (candidates if tune and (batch, seq_len) in tuned else [])
            best = dec.best_config(name, paged_attention, configs, (q, k_pages, v_pages, tables, lengths),
                                   ref, sets, lambda us: f"{kv_bytes / us / 1e6:5.2f} TB/s")
            del sets
            dense = [dec._inputs(jax.random.key(10 + i), batch, seq_len, heads, kv_heads, head_dim, jnp.bfloat16)
                     for i in range(dec.num_sets(kv_bytes))]
            with _triton.quiet():
                dense_us = dec.time_us(dec.decode_attention, dense)
            del dense
            if best is not None:
                rows.append((name, kv_bytes, best[0], best[1], dense_us, best[2]))
    print("\npaged_attention, bf16, full lengths, pages randomly permuted, TB/s over KV bytes read")
    print(f"{'shape':38s} {'KV MB':>7s} {'paged us':>9s} {'TB/s':>6s} {'rel err':>9s} {'decode us':>10s}"
          f" {'paged/decode':>12s}  best config")
    for name, nbytes, us, err, dus, cfg in rows:
        print(f"{name:38s} {nbytes / 1e6:7.1f} {us:9.1f} {nbytes / us / 1e6:6.2f} {err:9.2e} {dus:10.1f}"
              f" {us / dus:12.2f}  {cfg or 'default'}")


if __name__ == "__main__":
    main()
