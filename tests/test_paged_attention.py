"""Page management and paged_attention on CPU (Pallas interpret mode).

Interpret mode fills pallas outputs with NaN and pads out-of-bounds reads with NaN, so "no NaN
where the reference is finite" proves every output element was written.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa
from kernel_checks import assert_close
from pallas_kernels.decode_attention import BlockSizes, decode_attention_ref

# Relative L2 error and max abs error bounds per dtype (see test_decode_attention.py).

append = jax.jit(pa.append)
extend = jax.jit(pa.extend)
allocate = jax.jit(pa.allocate)
release = jax.jit(pa.release)


def _filled_pool(key, batch, max_len, page_size, max_pages, kv_heads, head_dim, dtype, num_pages):
    """A pool whose rows were written token by token (decode-style appends), so the rows' pages
    interleave in the pool; also returns the tokens written, k, v [B, max_len, G, K]."""
    kk, kv = jax.random.split(key)
    k = jax.random.normal(kk, (batch, max_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, max_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    pool = pa.init_pages(num_pages, page_size, batch, max_pages, kv_heads, head_dim, dtype)
    # Unused pool memory holds NaN: a read through a wrong table entry would show up.
    pool = pa.PagePool(jnp.full_like(pool.k_pages, jnp.nan), jnp.full_like(pool.v_pages, jnp.nan),
                       pool.free, pool.block_tables, pool.lengths)

    def step(pool, kv_t):
        return pa.append(pool, *kv_t), None

    pool, _ = jax.lax.scan(step, pool, (jnp.swapaxes(k, 0, 1), jnp.swapaxes(v, 0, 1)))
    return pool, k, v


def test_append_crosses_page_boundaries():
    batch, page_size = 3, 4
    pool = pa.init_pages(16, page_size, batch, 5, 2, 8, jnp.float32)
    tokens = jax.random.normal(jax.random.key(0), (9, batch, 2, 8))  # [T, B, G, K]
    for t in range(9):
        pool = append(pool, tokens[t], tokens[t] + 1)
        pages_per_row = t // page_size + 1
        assert (np.asarray(pool.lengths) == t + 1).all()
        assert int((np.asarray(pool.block_tables) >= 0).sum()) == batch * pages_per_row
        assert int(np.asarray(pool.free).sum()) == 16 - batch * pages_per_row
    tables = np.asarray(pool.block_tables)[:, :3]
    assert len(set(tables.ravel().tolist())) == batch * 3, "rows must not share pages"
    k, v = pa.gather(pool)  # [B, 5 * page_size, G, K]
    np.testing.assert_array_equal(np.asarray(k[:, :9]), np.asarray(jnp.swapaxes(tokens, 0, 1)))
    np.testing.assert_array_equal(np.asarray(v[:, :9]), np.asarray(jnp.swapaxes(tokens, 0, 1) + 1))
    assert (np.asarray(k[:, 9:]) == 0).all()


def test_allocate_extend_release():
    pool = pa.init_pages(8, 4, 2, 4, 1, 8, jnp.float32)
    pool = allocate(pool, 1, 9)  # 3 pages for row 1
    assert np.asarray(pool.block_tables[1, :3]).tolist() == [0, 1, 2] and int(pool.block_tables[1, 3]) == -1
    assert int(pool.lengths[1]) == 0 and int(pool.free.sum()) == 5
    chunk = jax.random.normal(jax.random.key(1), (6, 1, 8))  # [T, G, K]
    pool = extend(pool, 0, chunk, 2 * chunk)  # row 0 takes 2 fresh pages
    assert int(pool.lengths[0]) == 6 and int(pool.free.sum()) == 3
    pool = extend(pool, 0, chunk[:3], chunk[:3])  # 6 + 3 tokens: crosses into a third page
    k, _ = pa.gather(pool)
    np.testing.assert_array_equal(np.asarray(k[0, :9]), np.asarray(jnp.concatenate([chunk, chunk[:3]])))
    pool = release(pool, 1)
    assert int(pool.free.sum()) == 5 and (np.asarray(pool.block_tables[1]) == -1).all()
    assert int(pool.lengths[1]) == 0


# (B, lengths, page_size, H, G, K, dtype, block_k, num_splits)
CASES = [
    (1, [40], 16, 2, 2, 64, jnp.float32, 16, None),
    (3, [70, 1, 32], 16, 8, 2, 64, jnp.bfloat16, 16, 3),  # GQA 4; 1 token; a page boundary
    (3, [1, 33, 64], 8, 8, 1, 128, jnp.float32, 32, 2),  # GQA 8; a block spans 4 pages
    (3, [65, 16, 17], 32, 4, 4, 128, jnp.bfloat16, 16, 1),  # pages larger than a block
]


def _case_id(case) -> str:
    B, lengths, page_size, H, G, K, dtype, block_k, num_splits = case
    return f"{B=}_{page_size=}_{H=}_{G=}_{K=}_{jnp.dtype(dtype).name}_{block_k=}_splits={num_splits}"


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_paged_matches_decode_ref_on_gathered_cache(case):
    batch, lengths, page_size, heads, kv_heads, head_dim, dtype, block_k, num_splits = case
    key = jax.random.key(zlib.crc32(_case_id(case).encode()))
    max_len = max(lengths)
    max_pages = -(-max_len // page_size) + 1
    pool, k, v = _filled_pool(key, batch, max_len, page_size, max_pages, kv_heads, head_dim, dtype,
                              num_pages=batch * max_pages + 3)
    k_dense, v_dense = pa.gather(pool)  # [B, max_pages * page_size, G, K]
    np.testing.assert_array_equal(np.asarray(k_dense[:, :max_len]), np.asarray(k))  # equals what was written
    # Ragged attention: each row attends only its first lengths[b] tokens of the pool.
    lengths = jnp.array(lengths, jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, heads, head_dim), jnp.float32).astype(dtype)
    block_sizes = BlockSizes(block_k=block_k, num_splits=num_splits, num_warps=4, num_stages=2)
    out = pa.paged_attention(q, pool.k_pages, pool.v_pages, pool.block_tables, lengths,
                             block_sizes=block_sizes, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()
    assert_close(out, decode_attention_ref(q, k_dense, v_dense, lengths), dtype)


def test_paged_default_blocks_match_paged_ref():
    pool, _, _ = _filled_pool(jax.random.key(7), 2, 100, 16, 8, 2, 64, jnp.float32, num_pages=20)
    pool = pa.PagePool(jnp.nan_to_num(pool.k_pages), jnp.nan_to_num(pool.v_pages), pool.free,
                       pool.block_tables, pool.lengths)  # the ref gathers whole pages
    q = jax.random.normal(jax.random.key(8), (2, 8, 64))
    args = (q, pool.k_pages, pool.v_pages, pool.block_tables, jnp.array([100, 37], jnp.int32))
    assert_close(pa.paged_attention(*args, interpret=True), pa.paged_attention_ref(*args), jnp.float32)
