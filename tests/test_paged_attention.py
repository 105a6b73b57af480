"""paged_attention and paged_attention_mq: Pallas interpret mode on the CPU, and the kernel tests
compiled on a GPU too (`pytest -m gpu`; kernel_checks.MODES).

Interpret mode fills pallas outputs with NaN and pads out-of-bounds reads with NaN, so "no NaN
where the reference is finite" proves every output element was written.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import paged_attention as pa
from pallas_kernels.flash_attention import flash_attention_ref
from kernel_checks import GPU, MODES, assert_close, gpu_marked_needs_gpu, reference  # noqa: F401 (autouse fixture)
from pallas_kernels.decode_attention import BlockSizes, decode_attention, decode_attention_ref
from pallas_kernels.kv_quant import quantize_kv

# Relative L2 error and max abs error bounds per dtype (see test_decode_attention.py).


def _paged_tokens(key, batch, max_len, page_size, max_pages, kv_heads, head_dim, dtype, num_pages):
    """Random tokens k, v [B, max_len, G, K] laid into randomly permuted pool pages, so the rows'
    pages interleave in the pool; the last logical page of every row is -1 in the table.

    Every slot that holds no token (free pages, and the tail of a row's last page) is NaN: a read
    through a wrong table entry or past the tokens shows up. Returns (k_pages, v_pages, tables, k, v).
    """
    kk, kv, kp = jax.random.split(key, 3)
    k = jax.random.normal(kk, (batch, max_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (batch, max_len, kv_heads, head_dim), jnp.float32).astype(dtype)
    owned = -(-max_len // page_size)  # pages per row
    perm = jax.random.permutation(kp, num_pages)[:batch * owned].reshape(batch, owned).astype(jnp.int32)
    tables = jnp.full((batch, max_pages), -1, jnp.int32).at[:, :owned].set(perm)
    pos = jnp.arange(max_len)
    page, slot = tables[:, pos // page_size], pos % page_size  # [B, max_len], [max_len]
    empty = jnp.full((num_pages, page_size, kv_heads, head_dim), jnp.nan, dtype)  # [P, page_size, G, K]
    return empty.at[page, slot].set(k), empty.at[page, slot].set(v), tables, k, v


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


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_paged_matches_decode_ref_on_the_tokens_written(case, interpret):
    batch, lengths, page_size, heads, kv_heads, head_dim, dtype, block_k, num_splits = case
    key = jax.random.key(zlib.crc32(_case_id(case).encode()))
    max_len = max(lengths)
    max_pages = -(-max_len // page_size) + 1
    k_pages, v_pages, tables, k, v = _paged_tokens(key, batch, max_len, page_size, max_pages, kv_heads, head_dim,
                                                   dtype, num_pages=batch * max_pages + 3)
    k_dense = pa.gather_pages(k_pages, tables)  # [B, max_pages * page_size, G, K]
    np.testing.assert_array_equal(np.asarray(k_dense[:, :max_len]), np.asarray(k))  # equals what was written
    # Ragged attention: each row attends only its first lengths[b] tokens of the pool.
    lengths = jnp.array(lengths, jnp.int32)
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, heads, head_dim), jnp.float32).astype(dtype)
    block_sizes = BlockSizes(block_k=block_k, num_splits=num_splits, num_warps=4, num_stages=2)
    out = pa.paged_attention(q, k_pages, v_pages, tables, lengths, block_sizes=block_sizes, interpret=interpret)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert np.isfinite(np.asarray(out.astype(jnp.float32))).all()
    assert_close(out, reference(decode_attention_ref, q, k, v, lengths), dtype)  # over the tokens written


def test_decode_tiling_takes_longer_steps_for_int8_pages_when_programs_fill_the_gpu():
    few, many = 8, 4 * 132
    assert pa.decode_block_sizes(few) == pa.decode_block_sizes(few, quantized=True) == BlockSizes()
    assert pa.decode_block_sizes(many) == BlockSizes(num_stages=2)
    assert pa.decode_block_sizes(many, quantized=True) == BlockSizes(block_k=128, num_stages=2)
    # the FMA path (int8 pages, R = 1): 64 keys a step and one max below two programs per SM, 32
    # keys and a max per key slot from there
    assert pa.decode_block_sizes(few, True, fma=True) == BlockSizes(num_stages=1)
    assert pa.decode_block_sizes(many, True, fma=True) == BlockSizes(block_k=32, num_stages=1, row_max=True)


@pytest.mark.parametrize("interpret", MODES)
def test_paged_default_blocks_match_paged_ref(interpret):
    k_pages, v_pages, tables, _, _ = _paged_tokens(jax.random.key(7), 2, 100, 16, 8, 2, 64, jnp.float32, num_pages=20)
    k_pages, v_pages = jnp.nan_to_num(k_pages), jnp.nan_to_num(v_pages)  # the ref gathers whole pages
    q = jax.random.normal(jax.random.key(8), (2, 8, 64))
    args = (q, k_pages, v_pages, tables, jnp.array([100, 37], jnp.int32))
    assert_close(pa.paged_attention(*args, interpret=interpret), reference(pa.paged_attention_ref, *args), jnp.float32)


# Compiled only (too large for interpret mode): Llama shapes, 4096 slots per row on randomly
# permuted pages, default tiling, ragged lengths. (H, G, page_size, lengths)
LONG_CASES = [(32, 32, 16, [1, 16, 4096, 1000]), (64, 8, 64, [4095, 1, 129, 2048])]


@GPU
@pytest.mark.parametrize("pages", ["bf16", "int8"])
@pytest.mark.parametrize("case", LONG_CASES, ids=[f"H={c[0]}_G={c[1]}_page={c[2]}" for c in LONG_CASES])
def test_paged_long_ragged_rows_match_ref(case, pages):
    heads, kv_heads, page_size, lengths = case
    batch, pages_per_row = len(lengths), 4096 // page_size
    kq, kk, kv, kp = jax.random.split(jax.random.key(zlib.crc32(repr(case).encode())), 4)
    q = jax.random.normal(kq, (batch, heads, 128), jnp.bfloat16)
    shape = (batch * pages_per_row, page_size, kv_heads, 128)  # [P, page_size, G, K]
    k_pages, v_pages = jax.random.normal(kk, shape, jnp.bfloat16), jax.random.normal(kv, shape, jnp.bfloat16)
    tables = jax.random.permutation(kp, batch * pages_per_row).reshape(batch, pages_per_row).astype(jnp.int32)
    lengths = jnp.array(lengths, jnp.int32)
    scales = {}
    if pages == "int8":  # quantize_kv reads [P, page_size, G, K] as [B, T, G, K]: scales [P, G, page_size]
        (k_pages, k_scale_pages), (v_pages, v_scale_pages) = quantize_kv(k_pages), quantize_kv(v_pages)
        scales = dict(k_scale_pages=k_scale_pages, v_scale_pages=v_scale_pages)
    out = pa.paged_attention(q, k_pages, v_pages, tables, lengths, **scales)
    assert_close(out, reference(pa.paged_attention_ref, q, k_pages, v_pages, tables, lengths, **scales), jnp.bfloat16)


# ---------------------------------------------------------------------------------------------
# paged_attention_mq: T queries per row (chunked prefill; T = 1 is decode) at positions
# q_start[b] + t, keys s < lengths[b], causal, queries t >= n_queries[b] padding.

def _mq_data(case_id: str, batch, num_tokens, heads, kv_heads, head_dim, dtype, page_size, rows, int8: bool):
    """Random q and a pool with every row's keys on randomly permuted pages, built in numpy (no
    per-op compiles). rows: (q_start, n_queries, length) per batch row.

    Poisoned with NaN: q at padding queries, and every pool slot (codes or, for int8, scales) that
    holds no key below its row's length, in owned and free pages alike (page 0 is never owned, so
    a masked table lookup, which reads page 0, would find NaN). A read there reaches the output.
    Returns (q, pages, tables, lengths, q_start, n_queries), pages = (k_pages, v_pages) or
    (k_pages, v_pages, k_scale_pages, v_scale_pages).
    """
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    q_start, n_queries, lengths = (np.array(x, np.int32) for x in zip(*rows))
    max_pages = -(-int(lengths.max()) // page_size) + 1  # one logical page past the longest row: -1
    num_pages = 1 + sum(-(-int(n) // page_size) for n in lengths) + 2  # page 0 and two free pages
    q = rng.standard_normal((batch, num_tokens, heads, head_dim)).astype(np.float32)
    q[np.arange(num_tokens)[None, :] >= n_queries[:, None]] = np.nan  # [B, T] padding queries
    shape = (num_pages, page_size, kv_heads, head_dim)
    if int8:
        k_pages, v_pages = (rng.integers(-127, 128, shape).astype(np.int8) for _ in range(2))
        scales = [rng.uniform(1.5, 3.5, (num_pages, kv_heads, page_size)).astype(np.float32) / 127 for _ in range(2)]
    else:
        k_pages, v_pages = (rng.standard_normal(shape).astype(np.float32) for _ in range(2))
    used = np.zeros((num_pages, page_size), bool)  # slots holding a key below their row's length
    tables = np.full((batch, max_pages), -1, np.int32)
    perm, n = 1 + rng.permutation(num_pages - 1), 0
    for b, length in enumerate(lengths):
        for i in range(-(-int(length) // page_size)):
            tables[b, i], n = perm[n], n + 1
            used[tables[b, i]] = np.arange(i * page_size, (i + 1) * page_size) < length
    if int8:
        pages = (k_pages, v_pages, *(np.where(used[:, None], s, np.nan) for s in scales))  # [P, G, page_size]
    else:
        pages = tuple(np.where(used[:, :, None, None], p, np.nan).astype(jnp.dtype(dtype)) for p in (k_pages, v_pages))
    return (jnp.asarray(q, dtype), tuple(map(jnp.asarray, pages)), jnp.asarray(tables),
            *(jnp.asarray(x) for x in (lengths, q_start, n_queries)))


# (B, T, H, G, K, q dtype, page_size, int8 pages, rows [(q_start, n_queries, length)], BlockSizes).
# Together: GQA R = 1, 4, 8; K 64 and 128; bf16 and float32; pages of 16 and 64; int8 pages; first
# chunks, chunks after cached context, T = 1 and one-query rows padded to T; a row of padding
# only; queries past the row's length; keys past a query's position; several query blocks; splits.
MQ_CASES = [
    (3, 8, 8, 2, 64, jnp.float32, 16, False, [(0, 8, 8), (21, 5, 26), (40, 1, 41)], BlockSizes(block_k=16)),
    (2, 16, 4, 4, 128, jnp.bfloat16, 64, False, [(70, 16, 86), (0, 3, 3)],
     BlockSizes(block_k=32, num_splits=3, block_q=8)),
    (2, 5, 16, 2, 128, jnp.float32, 16, False, [(33, 5, 38), (0, 0, 10)], BlockSizes(block_k=32, num_splits=2)),
    (3, 1, 8, 1, 64, jnp.bfloat16, 64, False, [(0, 1, 1), (99, 1, 100), (63, 1, 64)],
     BlockSizes(block_k=16, num_splits=4)),
    # Row 1's tiles start at positions 14, 16, 18 (block_k 16): the first sees block 0 but not in full.
    (2, 6, 4, 1, 64, jnp.float32, 16, False, [(10, 6, 13), (14, 6, 30)], BlockSizes(block_k=16, num_splits=2, block_q=2)),
    (2, 7, 8, 2, 128, jnp.bfloat16, 16, True, [(17, 7, 24), (0, 4, 4)], BlockSizes(block_k=16, num_splits=2)),
    (2, 4, 8, 1, 64, jnp.float32, 64, True, [(64, 4, 68), (120, 2, 122)], BlockSizes(block_k=32)),
]


def _mq_id(case) -> str:
    B, T, H, G, K, dtype, page_size, int8, _, bs = case
    return (f"{B=}_{T=}_{H=}_{G=}_{K=}_{jnp.dtype(dtype).name}_{page_size=}{'_int8' if int8 else ''}"
            f"_block_q={bs.block_q}_splits={bs.num_splits}")


def _mq_call(fn, q, pages, tables, lengths, q_start, n_queries, **kwargs):
    scales = dict(zip(("k_scale_pages", "v_scale_pages"), pages[2:]))
    return fn(q, *pages[:2], tables, lengths, q_start, n_queries, **scales, **kwargs)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", MQ_CASES, ids=[_mq_id(c) for c in MQ_CASES])
def test_paged_mq_matches_ref(case, interpret):
    """Within the q dtype's bounds of the float32 ref, finite everywhere (no poisoned slot read),
    and exact zeros for padding queries."""
    B, T, H, G, K, dtype, page_size, int8, rows, block_sizes = case
    args = _mq_data(_mq_id(case), B, T, H, G, K, dtype, page_size, rows, int8)
    out = _mq_call(pa.paged_attention_mq, *args, block_sizes=block_sizes, interpret=interpret)
    assert out.shape == args[0].shape and out.dtype == dtype
    out32 = np.asarray(out.astype(jnp.float32))
    assert np.isfinite(out32).all()
    padding = np.arange(T)[None, :] >= np.array([r[1] for r in rows])[:, None]  # [B, T]
    assert (out32[padding] == 0).all()
    assert_close(out, reference(_mq_call, pa.paged_attention_mq_ref, *args), dtype)


def test_paged_mq_ref_matches_flash_ref_on_gathered_cache():
    """The ref against an independent one: flash_attention_ref over the gathered cache, for chunks
    written before attending (lengths = q_start + n_queries: there both define padding the same)."""
    B, T, H, G, K, page_size = 3, 6, 8, 2, 64, 16
    rows = [(0, 6, 6), (19, 4, 23), (33, 1, 34)]
    q, pages, tables, lengths, q_start, n_queries = _mq_data("flash_ref", B, T, H, G, K, jnp.float32, page_size,
                                                             rows, False)
    q = jnp.nan_to_num(q)  # flash_attention_ref keeps NaN in its padding rows' softmax
    k, v = (jnp.nan_to_num(pa.gather_pages(p, tables)) for p in pages)  # [B, S, G, K]
    want = flash_attention_ref(q, k, v, q_start, lengths)
    got = pa.paged_attention_mq_ref(q, *pages, tables, lengths, q_start, n_queries)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("interpret", MODES)
def test_paged_mq_one_query_equals_paged_decode(interpret):
    """paged_attention is paged_attention_mq at T = 1, q_start = lengths - 1: the same kernel."""
    rows = [(0, 1, 1), (36, 1, 37), (63, 1, 64)]
    q, pages, tables, lengths, q_start, n_queries = _mq_data("one_query", 3, 1, 8, 2, 64, jnp.float32, 16, rows, True)
    block_sizes = BlockSizes(block_k=16, num_splits=2)
    got = _mq_call(pa.paged_attention_mq, q, pages, tables, lengths, q_start, n_queries, block_sizes=block_sizes,
                   interpret=interpret)
    want = pa.paged_attention(q[:, 0], *pages[:2], tables, lengths, k_scale_pages=pages[2], v_scale_pages=pages[3],
                              block_sizes=block_sizes, interpret=interpret)
    np.testing.assert_array_equal(np.asarray(got[:, 0]), np.asarray(want))


@GPU
@pytest.mark.parametrize("int8", [False, True], ids=["bf16", "int8"])
def test_paged_mq_long_chunks_match_ref(int8):
    """Compiled only: Llama-2-70B-like heads (64:8, K = 128), 256-token chunks after ~1000 cached
    tokens and a first chunk, default tiling."""
    rows = [(1000, 256, 1256), (0, 200, 200)]
    args = _mq_data(f"long_{int8}", 2, 256, 64, 8, 128, jnp.bfloat16, 16, rows, int8)
    out = _mq_call(pa.paged_attention_mq, *args)
    assert_close(out, reference(_mq_call, pa.paged_attention_mq_ref, *args), jnp.bfloat16)


MQ_VALIDATION_CASES = [  # (what is wrong, a regex the ValueError's message must match)
    ("q_rank", r"expected q \[B, T, H, K\]"),
    ("q_start_shape", r"expected q_start \[B\] = \(2,\); got q_start.shape=\(3,\)"),
    ("n_queries_shape", r"expected n_queries \[B\] = \(2,\); got n_queries.shape=\(2, 1\)"),
    ("tables_batch", r"expected block_tables \[B, max_pages\]"),
]


@pytest.mark.parametrize("fn", [pa.paged_attention_mq, pa.paged_attention_mq_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize("kind,match", MQ_VALIDATION_CASES, ids=[c[0] for c in MQ_VALIDATION_CASES])
def test_paged_mq_validation_names_the_value(fn, kind, match):
    q = jnp.zeros((2, 3, 4, 64), jnp.float32)
    pages = jnp.zeros((4, 16, 2, 64), jnp.float32)
    tables, vec = jnp.zeros((2, 2), jnp.int32), jnp.ones((2,), jnp.int32)
    args = dict(q=q, tables=tables, lengths=vec, q_start=vec, n_queries=vec)
    args.update({"q_rank": dict(q=q[:, 0]), "q_start_shape": dict(q_start=jnp.ones((3,), jnp.int32)),
                 "n_queries_shape": dict(n_queries=vec[:, None]), "tables_batch": dict(tables=tables[:1])}[kind])
    with pytest.raises(ValueError, match=match):
        fn(args["q"], pages, pages, args["tables"], args["lengths"], args["q_start"], args["n_queries"], interpret=True)


# ---------------------------------------------------------------------------------------------
# int8 pages: k_pages, v_pages int8 [P, page_size, G, K] with float32 scales [P, G, page_size].

def _int8_paged_data(case_id: str, batch, lengths, page_size, kv_heads, head_dim, num_pages):
    """One set of int8 keys and values in both layouts, built in numpy (no per-op compiles).

    Static: codes [B, S, G, K] and scales [B, G, S] with S = max_pages * page_size. Paged: the
    same keys on randomly permuted pool pages, pages a row does not own holding other codes. Page 0
    is never owned, so a masked key (its table lookup gives page 0) would read a NaN scale.
    Returns (static, pages, tables, poisoned): static = (k, v, k_scale, v_scale), pages =
    (k_pages, v_pages, k_scale_pages, v_scale_pages); poisoned = the two scale arrays of each
    layout with NaN at every slot that holds no key below its row's length.
    """
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    max_pages = -(-max(lengths) // page_size) + 1  # one logical page past the longest row: -1 in the table
    seq = max_pages * page_size

    def codes(shape):
        return rng.integers(-127, 128, shape).astype(np.int8)

    def scales(shape):  # near absmax / 127 of a unit normal K-vector, so scores and values are O(1)
        return rng.uniform(1.5, 3.5, shape).astype(np.float32) / 127

    k, v = codes((batch, seq, kv_heads, head_dim)), codes((batch, seq, kv_heads, head_dim))  # [B, S, G, K]
    k_scale, v_scale = scales((batch, kv_heads, seq)), scales((batch, kv_heads, seq))  # [B, G, S]
    page_shape = (num_pages, page_size, kv_heads, head_dim)
    k_pages, v_pages = codes(page_shape), codes(page_shape)  # [P, page_size, G, K]
    k_scale_pages, v_scale_pages = scales((num_pages, kv_heads, page_size)), scales((num_pages, kv_heads, page_size))
    tables = np.full((batch, max_pages), -1, np.int32)
    perm = 1 + rng.permutation(num_pages - 1)
    used = np.zeros((num_pages, page_size), bool)  # slots holding a real key
    n = 0
    for b, length in enumerate(lengths):
        for i in range(-(-length // page_size)):
            p, span = perm[n], slice(i * page_size, (i + 1) * page_size)
            n += 1
            tables[b, i] = p
            k_pages[p], v_pages[p] = k[b, span], v[b, span]
            k_scale_pages[p], v_scale_pages[p] = k_scale[b, :, span], v_scale[b, :, span]
            used[p] = np.arange(i * page_size, (i + 1) * page_size) < length
    tail = np.arange(seq)[None, :] >= np.asarray(lengths)[:, None]  # [B, S]
    poisoned = (np.where(tail[:, None], np.nan, k_scale), np.where(tail[:, None], np.nan, v_scale),
                np.where(used[:, None], k_scale_pages, np.nan), np.where(used[:, None], v_scale_pages, np.nan))
    static, pages = (k, v, k_scale, v_scale), (k_pages, v_pages, k_scale_pages, v_scale_pages)
    return (tuple(map(jnp.asarray, static)), tuple(map(jnp.asarray, pages)), jnp.asarray(tables),
            tuple(map(jnp.asarray, poisoned)))


# (B, lengths, page_size, H, G, K, q dtype, block_k, num_splits). Together: batch 1 and 3, GQA
# R = 1 and 8, K 64 and 128, pages of 16 and 64, q bf16 and float32, lengths 1 and page multiples.
INT8_CASES = [
    (3, [1, 16, 45], 16, 8, 1, 64, jnp.bfloat16, 16, 2),  # R 8; 1 token; one full page
    (1, [64], 64, 2, 2, 128, jnp.float32, 16, None),  # R 1; one full page of 4 blocks
    (3, [65, 1, 128], 64, 4, 4, 64, jnp.float32, 32, 3),  # R 1; a page boundary + 1; two full pages
    (3, [33, 32, 1], 16, 16, 2, 128, jnp.bfloat16, 64, 1),  # R 8; a block spans 4 pages; one split
    (2, [200, 130], 16, 2, 2, 128, jnp.bfloat16, 128, 1),  # R 1; 128 keys (8 pages) per step, as at 256 rows
]


def _int8_case_id(case) -> str:
    B, lengths, page_size, H, G, K, dtype, block_k, num_splits = case
    return f"int8_{B=}_{page_size=}_{H=}_{G=}_{K=}_{jnp.dtype(dtype).name}_{block_k=}_splits={num_splits}"


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", INT8_CASES, ids=[_int8_case_id(c) for c in INT8_CASES])
def test_paged_int8_matches_int8_ref(case, interpret):
    """Same bounds as a float pool of q's dtype (the codes convert exactly to q's dtype). The
    kernel's scales are NaN at every slot holding no key below the row's length, in owned and
    free pages alike: a key read past the length or through a wrong table entry reaches the output."""
    batch, lengths, page_size, heads, kv_heads, head_dim, dtype, block_k, num_splits = case
    num_pages = batch * (-(-max(lengths) // page_size)) + 3
    _, pages, tables, poisoned = _int8_paged_data(_int8_case_id(case), batch, lengths, page_size, kv_heads,
                                                  head_dim, num_pages)
    k_pages, v_pages, k_scale_pages, v_scale_pages = pages
    lengths = jnp.array(lengths, jnp.int32)
    q = jax.random.normal(jax.random.key(zlib.crc32(_int8_case_id(case).encode())), (batch, heads, head_dim),
                          jnp.float32).astype(dtype)
    ref = reference(pa.paged_attention_ref, q, k_pages, v_pages, tables, lengths, k_scale_pages=k_scale_pages,
                    v_scale_pages=v_scale_pages)  # the ref gathers whole pages: finite scales
    block_sizes = BlockSizes(block_k=block_k, num_splits=num_splits, num_warps=4, num_stages=2)
    out = pa.paged_attention(q, k_pages, v_pages, tables, lengths, k_scale_pages=poisoned[2],
                             v_scale_pages=poisoned[3], block_sizes=block_sizes, interpret=interpret)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)


# int8 pages with one query head per KV head (R = 1) take the FMA path by default. (B, lengths,
# page_size, H, K, q dtype, block_k, num_splits, num_warps): q bf16 sums folded, float32 exact;
# blocks spanning pages and pages spanning blocks; one key; splits; a slice per 16 or 32 keys.
FMA_CASES = [
    (3, [1, 40, 130], 16, 4, 128, jnp.bfloat16, 64, None, 4),
    (2, [200, 64], 64, 2, 64, jnp.float32, 32, 3, 4),
    (2, [17, 96], 8, 2, 128, jnp.float32, 64, 1, 2),
    (1, [300], 16, 2, 128, jnp.bfloat16, 128, 2, 8),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", FMA_CASES, ids=[f"fma{i}" for i in range(len(FMA_CASES))])
def test_paged_int8_fma_path_matches_ref_and_the_dot_path(case, interpret):
    """The FMA path (fma None or True, with one running max per program or per key slot) against
    the float32 reference, within the bounds of a float pool of q's dtype, and against the
    tensor-core path (fma=False) on the same pages. Scales are NaN at every slot past the lengths,
    so a key read but not masked reaches the output."""
    batch, lengths, page_size, heads, head_dim, dtype, block_k, num_splits, num_warps = case
    case_id = f"fma_{case}"
    num_pages = batch * (-(-max(lengths) // page_size)) + 3
    _, pages, tables, poisoned = _int8_paged_data(case_id, batch, lengths, page_size, heads, head_dim, num_pages)
    lengths = jnp.array(lengths, jnp.int32)
    q = jax.random.normal(jax.random.key(zlib.crc32(case_id.encode())), (batch, heads, head_dim),
                          jnp.float32).astype(dtype)
    ref = reference(pa.paged_attention_ref, q, *pages[:2], tables, lengths, k_scale_pages=pages[2],
                    v_scale_pages=pages[3])
    outs = {}
    for fma, row_max in ((None, False), (True, False), (False, False), (True, True)):
        bs = BlockSizes(block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=2, fma=fma,
                        row_max=row_max)
        out = outs[fma, row_max] = pa.paged_attention(q, *pages[:2], tables, lengths, k_scale_pages=poisoned[2],
                                                      v_scale_pages=poisoned[3], block_sizes=bs, interpret=interpret)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_close(out, ref, dtype)
    f32 = {key: np.asarray(out.astype(jnp.float32)) for key, out in outs.items()}
    np.testing.assert_array_equal(f32[None, False], f32[True, False])  # None means the FMA path
    assert_close(outs[True, False], outs[False, False], dtype)
    assert_close(outs[True, True], outs[True, False], dtype)  # a max per key slot: the same result


# paged_attention_append: (B, lengths, kv_len - lengths, page_size, H, K, q dtype, block_k,
# num_splits, num_warps, row_max). A row whose next slot is on a page the table lacks (64 keys in
# pages of 64: the next entry is -1) drops its new key; a row with kv_len = lengths stores it unseen.
APPEND_CASES = [
    (3, [1, 40, 130], [1, 1, 1], 16, 4, 128, jnp.bfloat16, 64, None, 4, False),
    (2, [200, 64], [1, 1], 64, 2, 64, jnp.float32, 32, 3, 4, False),
    (2, [17, 95], [0, 1], 8, 2, 128, jnp.float32, 64, 1, 2, True),
    (1, [300], [1], 16, 2, 128, jnp.bfloat16, 128, 2, 8, True),
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", APPEND_CASES, ids=[f"append{i}" for i in range(len(APPEND_CASES))])
def test_paged_int8_append_equals_quantize_write_then_attend(case, interpret):
    """The kernel's cache write equals quantize_kv's codes and scales written at slot lengths[b]
    (bit for bit, every other slot untouched, NaN scales included), and its output equals the
    reference over the pages so written, the new key counted where kv_len[b] > lengths[b]."""
    batch, lengths, extra, page_size, heads, head_dim, dtype, block_k, num_splits, num_warps, row_max = case
    case_id = f"append_{case}"
    num_pages = batch * (-(-max(lengths) // page_size) + 1) + 3
    _, pages, tables, poisoned = _int8_paged_data(case_id, batch, lengths, page_size, heads, head_dim, num_pages)
    rng = np.random.default_rng(zlib.crc32(case_id.encode()))
    q, k_new, v_new = (jnp.asarray(rng.normal(size=(batch, heads, head_dim)) * scale, jnp.float32).astype(dtype)
                       for scale in (1.0, 2.0, 0.5))
    k_new = k_new.at[0, 0].set(0)  # an all-zero key: scale 0, codes 0
    # The expected pages: quantize_kv's rounding written where the slot's page is in the table.
    old = np.asarray(lengths)
    entry, slot = old // page_size, old % page_size
    page = np.asarray(tables)[np.arange(batch), np.minimum(entry, tables.shape[1] - 1)]
    fits = (entry < tables.shape[1]) & (page >= 0)
    if lengths == [200, 64]:
        assert fits.tolist() == [True, False]  # the 64-key row's next page is not in the table
    (kc, ks), (vc, vs) = quantize_kv(k_new[:, None]), quantize_kv(v_new[:, None])  # [B, 1, G, K], [B, G, 1]
    want = [np.array(a) for a in (pages[0], pages[1], poisoned[2], poisoned[3])]
    for b in np.flatnonzero(fits):
        want[0][page[b], slot[b]], want[1][page[b], slot[b]] = kc[b, 0], vc[b, 0]
        want[2][page[b], :, slot[b]], want[3][page[b], :, slot[b]] = ks[b, :, 0], vs[b, :, 0]
    lengths = jnp.asarray(old, jnp.int32)
    kv_len = lengths + jnp.asarray(extra, jnp.int32)
    bs = BlockSizes(block_k=block_k, num_splits=num_splits, num_warps=num_warps, num_stages=1, row_max=row_max)
    out, *new_pages = pa.paged_attention_append(
        q, *pages[:2], tables, lengths, kv_len, k_new, v_new, k_scale_pages=poisoned[2], v_scale_pages=poisoned[3],
        block_sizes=bs, interpret=interpret)
    for got, w in zip(new_pages, want):
        np.testing.assert_array_equal(np.asarray(got), w)
    seen = jnp.where(jnp.asarray(fits), kv_len, lengths)
    full = [jnp.asarray(np.where(np.isnan(w), 1.0, w)) if w.dtype == np.float32 else jnp.asarray(w) for w in want]
    ref = reference(pa.paged_attention_ref, q, full[0], full[1], tables, seen, k_scale_pages=full[2],
                    v_scale_pages=full[3])
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, dtype)


def test_paged_int8_append_validation():
    q = jnp.zeros((2, 4, 64), jnp.float32)
    pages = jnp.zeros((4, 16, 4, 64), jnp.int8)
    scales = jnp.ones((4, 4, 16), jnp.float32)
    tables, lengths, new = jnp.zeros((2, 2), jnp.int32), jnp.array([3, 1], jnp.int32), jnp.zeros((2, 4, 64))
    call = functools.partial(pa.paged_attention_append, interpret=True)
    with pytest.raises(ValueError, match="one query head per KV head.*8 query heads over 4"):
        call(jnp.zeros((2, 8, 64)), pages, pages, tables, lengths, lengths + 1, new, new, k_scale_pages=scales,
             v_scale_pages=scales)
    with pytest.raises(ValueError, match=r"k_new = v_new \[B, G, K\] = \(2, 4, 64\).*\(2, 4, 32\)"):
        call(q, pages, pages, tables, lengths, lengths + 1, new, new[..., :32], k_scale_pages=scales,
             v_scale_pages=scales)
    with pytest.raises(ValueError, match=r"kv_len \[B\] = \(2,\)"):
        call(q, pages, pages, tables, lengths, lengths[:1], new, new, k_scale_pages=scales, v_scale_pages=scales)
    with pytest.raises(ValueError, match="FMA path only"):
        call(q, pages, pages, tables, lengths, lengths + 1, new, new, k_scale_pages=scales, v_scale_pages=scales,
             block_sizes=BlockSizes(fma=False))


def test_paged_int8_fma_path_is_the_default_for_one_head_per_kv_head():
    """jnp.dot never runs on the FMA path (it has none), and does on the dot path: which path a
    call takes, read from its jaxpr."""
    _, pages, tables, _ = _int8_paged_data("fma_default", 2, [20, 5], 16, 4, 64, 6)
    lengths = jnp.array([20, 5], jnp.int32)

    def dots(q, **kw):
        text = str(jax.make_jaxpr(lambda q: pa.paged_attention(
            q, *pages[:2], tables, lengths, k_scale_pages=pages[2], v_scale_pages=pages[3], interpret=True, **kw))(q))
        return text.count("dot_general")

    q1 = jnp.zeros((2, 4, 64), jnp.bfloat16)  # R = 1
    assert dots(q1) == 0 and dots(q1, block_sizes=BlockSizes(fma=True)) == 0
    assert dots(q1, block_sizes=BlockSizes(fma=False)) > 0
    q4 = jnp.zeros((2, 16, 64), jnp.bfloat16)  # R = 4: the dot path, whatever fma says
    assert dots(q4) > 0 and dots(q4, block_sizes=BlockSizes(fma=True)) > 0


@pytest.mark.parametrize("interpret", MODES)
def test_paged_int8_equals_static_int8_decode(interpret):
    """The paged kernel over int8 pages equals the static-cache kernel over the same codes and
    scales in the [B, S, G, K] / [B, G, S] layout: same tiling, so the same blocks and arithmetic;
    only where a key's bytes come from differs (bit for bit in interpret mode; compiled, the two
    kernels may contract multiply-adds differently). Both layouts are NaN-poisoned past the lengths."""
    batch, lengths, page_size, heads, kv_heads, head_dim = 3, [48, 1, 70], 16, 8, 2, 64
    static, pages, tables, poisoned = _int8_paged_data("int8_static", batch, lengths, page_size, kv_heads,
                                                       head_dim, num_pages=16)
    lengths = jnp.array(lengths, jnp.int32)
    q = jax.random.normal(jax.random.key(3), (batch, heads, head_dim), jnp.bfloat16)
    block_sizes = BlockSizes(block_k=32, num_splits=2, num_warps=4, num_stages=2)
    out = pa.paged_attention(q, *pages[:2], tables, lengths, k_scale_pages=poisoned[2], v_scale_pages=poisoned[3],
                             block_sizes=block_sizes, interpret=interpret)
    want = decode_attention(q, *static[:2], lengths, k_scale=poisoned[0], v_scale=poisoned[1],
                            block_sizes=block_sizes, interpret=interpret)
    if interpret:
        np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)), np.asarray(want.astype(jnp.float32)))
    else:
        assert_close(out, want, jnp.bfloat16)


def _bad_int8_page_args(kind: str):
    """(k_pages, v_pages, kwargs) for paged_attention(q, k_pages, v_pages, tables, lengths, **kwargs)
    with one thing wrong."""
    k8 = v8 = jnp.zeros((4, 16, 2, 64), jnp.int8)  # [P, page_size, G, K]
    k_scale = v_scale = jnp.ones((4, 2, 16), jnp.float32)  # [P, G, page_size]
    kf = jnp.zeros((4, 16, 2, 64), jnp.bfloat16)
    return {
        "int8_without_scales": (k8, v8, {}),
        "scales_with_float_pages": (kf, kf, dict(k_scale_pages=k_scale, v_scale_pages=v_scale)),
        "only_k_scale": (k8, v8, dict(k_scale_pages=k_scale)),
        "only_v_scale": (k8, v8, dict(v_scale_pages=v_scale)),
        "k_int8_v_bf16": (k8, kf, dict(k_scale_pages=k_scale, v_scale_pages=v_scale)),
        "k_scale_token_major": (k8, v8, dict(k_scale_pages=k_scale.transpose(0, 2, 1), v_scale_pages=v_scale)),
        "v_scale_shape": (k8, v8, dict(k_scale_pages=k_scale, v_scale_pages=v_scale[:, :, :8])),
        "k_scale_dtype": (k8, v8, dict(k_scale_pages=k_scale.astype(jnp.bfloat16), v_scale_pages=v_scale)),
    }[kind]


# (what is wrong, the error, a regex its message must match)
INT8_VALIDATION_CASES = [
    ("int8_without_scales", TypeError, r"k_scale_pages and v_scale_pages \[P, G, page_size\] float32 are needed for int8 pages"),
    ("scales_with_float_pages", TypeError, "only for int8 pages.*bfloat16"),
    ("only_k_scale", TypeError, "both k_scale_pages and v_scale_pages.*v_scale_pages None"),
    ("only_v_scale", TypeError, "both k_scale_pages and v_scale_pages.*k_scale_pages None"),
    ("k_int8_v_bf16", TypeError, "same dtype.*int8.*bfloat16"),
    ("k_scale_token_major", ValueError, r"k_scale_pages \[P, G, page_size\] = \(4, 2, 16\).*\(4, 16, 2\)"),
    ("v_scale_shape", ValueError, r"v_scale_pages \[P, G, page_size\] = \(4, 2, 16\).*\(4, 2, 8\)"),
    ("k_scale_dtype", TypeError, "k_scale_pages float32.*bfloat16"),
]


@pytest.mark.parametrize("fn", [pa.paged_attention, pa.paged_attention_ref], ids=["kernel", "ref"])
@pytest.mark.parametrize("kind,error,match", INT8_VALIDATION_CASES, ids=[c[0] for c in INT8_VALIDATION_CASES])
def test_int8_pages_validation_names_the_value(fn, kind, error, match):
    q = jnp.zeros((2, 4, 64), jnp.float32)
    k_pages, v_pages, kwargs = _bad_int8_page_args(kind)
    tables, lengths = jnp.zeros((2, 2), jnp.int32), jnp.array([16, 1], jnp.int32)
    with pytest.raises(error, match=match):
        fn(q, k_pages, v_pages, tables, lengths, interpret=True, **kwargs)
