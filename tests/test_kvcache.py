"""The paged KV cache against the static one, and the page table's accounting."""
import dataclasses

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import random_params
from jllm import kvcache
from jllm.attention import rope
from jllm.config import LlamaConfig
from jllm.kvcache import init_cache, init_paged_cache, release, reserve
from jllm.model import logits, transformer
from jllm.plan import Plan
from kernel_checks import assert_close
from pallas_kernels.decode_attention import BlockSizes, decode_attention
from pallas_kernels.kv_quant import dequantize_kv, quantize_kv
from pallas_kernels.paged_attention import paged_attention

PAGE = 4


@pytest.mark.parametrize("attn_impl", ["xla", "pallas"])
@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_paged_forward_matches_static_cache(attn_impl, dtype):
    """Chunked prefill (chunks of 5, rows of different lengths) then decode steps: logits over a
    paged cache equal those over a static cache, every step, float32 or int8 pages."""
    cfg = LlamaConfig.from_name("tiny")
    params = random_params(cfg)
    plan = Plan(attn_impl=attn_impl)
    rng = np.random.default_rng(0)
    B, lens, steps = 3, [11, 3, 7], 6
    max_len = max(lens) + steps + 4
    prompts = [rng.integers(3, cfg.vocab_size, n) for n in lens]
    kv_dtype = jnp.int8 if dtype == "int8" else jnp.float32
    static = init_cache(cfg, B, max_len, kv_dtype)
    max_pages = -(-max_len // PAGE)
    paged = init_paged_cache(cfg, B * max_pages + 3, PAGE, B, max_pages, kv_dtype)
    # Interleave the rows' pages in the pool: reserve one more page at a time, row by row.
    for n in range(1, max_pages + 1):
        for b in range(B):
            owned = np.asarray(jnp.sum(paged.block_tables >= 0, axis=1)) * PAGE
            owned[b] = n * PAGE
            paged = dataclasses.replace(paged, table=reserve(paged.table, jnp.asarray(owned), PAGE))
    chunk = 5
    for start in range(0, max(lens), chunk):
        tokens = np.zeros((B, chunk), np.int32)
        n = np.zeros((B,), np.int32)
        for b, p in enumerate(prompts):
            piece = p[start:start + chunk]
            tokens[b, :len(piece)], n[b] = piece, len(piece)
        ls, static = _step(params, tokens, n, static, cfg, plan)
        lp, paged = _step(params, tokens, n, paged, cfg, plan)
        for b in range(B):
            np.testing.assert_allclose(lp[b, :n[b]], ls[b, :n[b]], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(paged.lengths), lens)
    token = np.asarray([p[-1] for p in prompts], np.int32)[:, None]
    for _ in range(steps):
        ls, static = _step(params, token, np.ones(B, np.int32), static, cfg, plan)
        lp, paged = _step(params, token, np.ones(B, np.int32), paged, cfg, plan)
        np.testing.assert_allclose(lp, ls, rtol=1e-5, atol=1e-5)
        token = ls[:, -1].argmax(-1).astype(np.int32)[:, None]


_transformer = jax.jit(transformer, static_argnames=("cfg", "plan"))


def _step(params, tokens, n, cache, cfg, plan):
    """Logits [B, T, V] of tokens with n[b] real tokens per row, and the updated cache."""
    h, cache = _transformer(params, jnp.asarray(tokens), cache, cfg, plan, n_tokens=jnp.asarray(n))
    return np.asarray(logits(params, h)), cache


def test_paged_write_drops_tokens_without_a_page():
    """Tokens past a row's reserved pages (and padding tokens) are not written anywhere."""
    cfg = LlamaConfig.from_name("tiny")
    cache = init_paged_cache(cfg, 4, PAGE, 2, 3, jnp.float32)
    cache = dataclasses.replace(cache, table=reserve(cache.table, jnp.asarray([PAGE, 0]), PAGE))
    k = jnp.ones((2, 2 * PAGE, cfg.n_kv_heads, cfg.head_dim))
    kp, vp, _, _ = cache.write(0, k, k, jnp.asarray([2 * PAGE, 2 * PAGE]), fresh=False)
    written = np.asarray(kp).reshape(4, -1).any(axis=1)  # [P] pages that got any write
    assert written.sum() == 1 and written[int(cache.block_tables[0, 0])]


def _append(cache, k, v, n_tokens):
    """Reserve the pages for n_tokens [B] more tokens per row, then write the first n_tokens[b] of
    k, v [B, T, G, K] at each row's length into every layer -> the updated cache."""
    cache = dataclasses.replace(cache, table=reserve(cache.table, cache.lengths + n_tokens, cache.page_size))
    layers = [cache.write(i, k, v, n_tokens, fresh=False) for i in range(len(cache.k_pages))]
    return cache.updated(layers, n_tokens)


_append_jit = jax.jit(_append)


def test_writes_cross_page_boundaries():
    """Decode-style writes, one token per step into rows of 9, 7 and 5 tokens: every row owns the
    pages its length needs, the rest stay free, rows never share a page, and gather returns the
    tokens written, zeros past each length."""
    cfg = LlamaConfig.from_name("tiny", n_layers=1)
    B, P, max_pages, lens = 3, 16, 5, np.array([9, 7, 5])
    cache = init_paged_cache(cfg, P, PAGE, B, max_pages, jnp.float32)
    tokens = jax.random.normal(jax.random.key(0), (B, 9, cfg.n_kv_heads, cfg.head_dim))  # [B, T, G, K]
    for t in range(9):
        n = jnp.asarray(t < lens, jnp.int32)  # a row past its length writes nothing
        cache = _append_jit(cache, tokens[:, t:t + 1], tokens[:, t:t + 1] + 1, n)
        now = np.minimum(t + 1, lens)
        owned = (np.asarray(cache.block_tables) >= 0).sum(axis=1)
        np.testing.assert_array_equal(np.asarray(cache.lengths), now)
        np.testing.assert_array_equal(owned, -(-now // PAGE))
        assert int(cache.table.free.sum()) == P - owned.sum()
    tables = np.asarray(cache.block_tables)
    pages = tables[tables >= 0]
    assert len(set(pages.tolist())) == len(pages) == 3 + 2 + 2, "rows must not share pages"
    assert not np.asarray(cache.table.free)[pages].any()
    k, v = kvcache.gather(cache, 0)  # [B, max_pages * PAGE, G, K]
    assert k.shape == (B, max_pages * PAGE, cfg.n_kv_heads, cfg.head_dim)
    for b, n in enumerate(lens):
        np.testing.assert_array_equal(np.asarray(k[b, :n]), np.asarray(tokens[b, :n]))
        np.testing.assert_array_equal(np.asarray(v[b, :n]), np.asarray(tokens[b, :n] + 1))
        assert (np.asarray(k[b, n:]) == 0).all() and (np.asarray(v[b, n:]) == 0).all()


def test_reserve_chunks_and_release():
    """reserve takes the lowest free pages; a chunk written with n_tokens stores only its real
    tokens, the next chunk crosses into a new page; release frees a row's pages and empties it."""
    cfg = LlamaConfig.from_name("tiny", n_layers=1)
    cache = init_paged_cache(cfg, 8, PAGE, 2, 4, jnp.float32)
    cache = dataclasses.replace(cache, table=reserve(cache.table, jnp.asarray([0, 9]), PAGE))  # 3 pages, row 1
    assert np.asarray(cache.block_tables[1]).tolist() == [0, 1, 2, -1]
    assert (np.asarray(cache.block_tables[0]) == -1).all()
    assert int(cache.lengths[1]) == 0 and int(cache.table.free.sum()) == 5
    chunk = jax.random.normal(jax.random.key(1), (1, 6, cfg.n_kv_heads, cfg.head_dim))  # [1, T, G, K]
    k = jnp.concatenate([chunk, chunk + 100])  # [2, T, G, K]: row 1 writes nothing (n_tokens 0)
    cache = _append_jit(cache, k, 2 * k, jnp.asarray([6, 0]))  # row 0 takes 2 fresh pages
    np.testing.assert_array_equal(np.asarray(cache.lengths), [6, 0])
    assert int(cache.table.free.sum()) == 3
    cache = _append_jit(cache, k, k, jnp.asarray([3, 0]))  # 6 + 3 tokens: a third page; the last 3 are padding
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9, 0])
    assert int(cache.table.free.sum()) == 2
    kd, vd = kvcache.gather(cache, 0)
    np.testing.assert_array_equal(np.asarray(kd[0, :9]), np.asarray(jnp.concatenate([chunk[0], chunk[0, :3]])))
    np.testing.assert_array_equal(np.asarray(vd[0, :9]), np.asarray(jnp.concatenate([2 * chunk[0], chunk[0, :3]])))
    k_pages = np.asarray(cache.k_pages[0])
    third = int(cache.block_tables[0, 2])
    assert (k_pages[third, 1:] == 0).all(), "padding tokens written past the row's length"
    assert (k_pages[[0, 1, 2]] == 0).all(), "row 1 wrote tokens with n_tokens 0"
    cache = dataclasses.replace(cache, table=release(cache.table, jnp.asarray([False, True])))
    assert int(cache.table.free.sum()) == 5 and np.asarray(cache.table.free)[[0, 1, 2]].all()
    assert (np.asarray(cache.block_tables[1]) == -1).all()
    np.testing.assert_array_equal(np.asarray(cache.lengths), [9, 0])


def test_pages_needed_counts_what_reserve_takes_past_a_rows_last_page():
    """A row holds max_pages pages: for more tokens reserve takes no more, and pages_needed says so
    (it counted pages no row can hold, so a scheduler would refuse work that fits)."""
    table = kvcache.init_page_table(8, 2, 2)
    tokens = jnp.asarray([12, 3])                                    # 3 pages wanted, 1 page
    need = int(kvcache.pages_needed(table, tokens, PAGE))
    after = reserve(table, tokens, PAGE)
    assert need == int(table.free.sum() - after.free.sum()) == 3


def test_int8_pages_round_trip_matches_decode_on_quantized_keys():
    """Prefill chunks and then decode steps into int8 pages store quantize_kv's codes and scales:
    gather gives their float32 dequantization (zeros past each length), and paged attention over
    the pages equals decode_attention over quantize_kv of the same keys. The writes run jitted
    with the cache donated, as a serving loop runs them."""
    cfg = LlamaConfig.from_name("tiny", dim=512, n_heads=8, n_layers=1)  # H 8, G 2, K 64
    B, G, K, page_size, chunk = 3, cfg.n_kv_heads, cfg.head_dim, 16, 15
    chunks, steps = np.array([2, 0, 1]), 3  # rows 0, 2 prefill 30 and 15 tokens, then 3 steps for every row:
    lengths = chunks * chunk + steps  # 33, 3, 18: steps into a fresh row and across pages
    seq = int(lengths.max())
    rng = np.random.default_rng(11)
    keep = (np.arange(seq)[None, :] < lengths[:, None])[..., None, None]  # [B, S, 1, 1]
    k, v = (np.where(keep, rng.standard_normal((B, seq, G, K), np.float32), 0) for _ in range(2))  # [B, S, G, K]
    cache = init_paged_cache(cfg, 12, page_size, B, 4, jnp.int8)
    assert cache.k_scale_pages[0].shape == (12, G, page_size) and cache.k_scale_pages[0].dtype == jnp.float32
    assert cache.k_pages[0].dtype == jnp.int8
    append = jax.jit(_append, donate_argnums=0)
    before = cache
    for c in range(chunks.max()):  # the second chunk of row 0 starts mid-page
        n = jnp.asarray(np.where(chunks > c, chunk, 0), jnp.int32)
        cache = append(cache, k[:, c * chunk:(c + 1) * chunk], v[:, c * chunk:(c + 1) * chunk], n)
    assert before.k_pages[0].is_deleted(), "the cache was not donated"
    for t in range(steps):  # row b's token at its own length
        pos = chunks * chunk + t
        cache = append(cache, k[np.arange(B), pos][:, None], v[np.arange(B), pos][:, None], jnp.ones(B, jnp.int32))
    np.testing.assert_array_equal(np.asarray(cache.lengths), lengths)
    (k8, k_scale), (v8, v_scale) = quantize_kv(jnp.asarray(k)), quantize_kv(jnp.asarray(v))  # the static cache
    k_dense, v_dense = kvcache.gather(cache, 0)  # [B, 4 * page_size, G, K] float32
    assert k_dense.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(k_dense[:, :seq]), np.asarray(dequantize_kv(k8, k_scale, jnp.float32)))
    np.testing.assert_array_equal(np.asarray(v_dense[:, :seq]), np.asarray(dequantize_kv(v8, v_scale, jnp.float32)))
    assert (np.asarray(k_dense[:, seq:]) == 0).all()
    lengths = jnp.asarray(lengths, jnp.int32)
    q = jax.random.normal(jax.random.key(5), (B, cfg.n_heads, K), jnp.float32)
    block_sizes = BlockSizes(block_k=16, num_splits=2, num_warps=4, num_stages=2)
    out = paged_attention(q, cache.k_pages[0], cache.v_pages[0], cache.block_tables, lengths,
                          k_scale_pages=cache.k_scale_pages[0], v_scale_pages=cache.v_scale_pages[0],
                          block_sizes=block_sizes, interpret=True)
    want = decode_attention(q, k8, v8, lengths, k_scale=k_scale, v_scale=v_scale, block_sizes=block_sizes,
                            interpret=True)
    assert_close(out, want, jnp.float32)


def test_int8_cache_refuses_codes_and_other_integer_dtypes():
    cfg = LlamaConfig.from_name("tiny", n_layers=1)
    with pytest.raises(ValueError, match="cache dtype 'int16'; expected one of"):
        init_paged_cache(cfg, 4, PAGE, 2, 2, jnp.int16)
    cache = init_paged_cache(cfg, 4, PAGE, 2, 2, jnp.int8)
    codes = jnp.zeros((2, 1, cfg.n_kv_heads, cfg.head_dim), jnp.int8)  # [B, T, G, K]
    with pytest.raises(TypeError, match="quantizes float k, v itself.*int8"):
        cache.write(0, codes, codes, jnp.ones(2, jnp.int32), fresh=False)
    float_cache = init_paged_cache(cfg, 4, PAGE, 2, 2, jnp.bfloat16)
    assert float_cache.k_scale_pages is None and float_cache.v_scale_pages is None


@pytest.mark.parametrize("fresh", [True, False], ids=["prefill", "chunk"])
def test_more_new_tokens_than_the_cache_holds_is_a_value_error(fresh):
    """T > max_len is static: refused, where the keys past the cache used to be dropped and
    the logits came back wrong without a word."""
    cfg = LlamaConfig.from_name("tiny", n_layers=1)
    params = random_params(cfg)
    tokens = jnp.arange(1, 11)[None]                                                 # [1, 10]
    transformer(params, tokens, init_cache(cfg, 1, 10, jnp.float32), cfg, fresh=fresh)  # fits exactly
    with pytest.raises(ValueError, match="10 new tokens do not fit a cache of max_len=8"):
        transformer(params, tokens, init_cache(cfg, 1, 8, jnp.float32), cfg, fresh=fresh)


@pytest.mark.parametrize("make, args, match", [
    (init_cache, (0, 16), "batch=0 must be an int >= 1"),
    (init_cache, (1, -1), "max_len=-1 must be an int >= 1"),
    (init_cache, (2.0, 16), "batch=2.0 must be an int >= 1"),
    (init_paged_cache, (4, 0, 2, 2), "page_size=0 must be an int >= 1"),
    (init_paged_cache, (4, PAGE, 2, True), "max_pages=True must be an int >= 1"),
], ids=["batch=0", "max_len=-1", "batch=2.0", "page_size=0", "max_pages=True"])
def test_cache_sizes_that_are_not_positive_ints_name_the_value(make, args, match):
    cfg = LlamaConfig.from_name("tiny", n_layers=1)
    with pytest.raises(ValueError, match=match):
        make(cfg, *args, jnp.float32)
    with pytest.raises(TypeError, match="cfg='tiny' must be a LlamaConfig"):
        make("tiny", *args, jnp.float32)


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(st.lists(st.tuples(st.sampled_from(["grow", "release"]), st.integers(0, 3),
                                     st.integers(0, 24)), min_size=1, max_size=30))
def test_reserve_and_release_never_give_a_page_twice(ops):
    """Over random reserve/release sequences: every page is free or owned by exactly one row slot,
    rows own the pages their lengths need (when the pool has them), and releasing all frees all."""
    P, B, max_pages = 12, 4, 6
    table = kvcache.init_page_table(P, B, max_pages)
    want = np.zeros(B, np.int32)
    for op, row, n in ops:
        if op == "grow":
            want[row] = max(want[row], n)
            need = int(kvcache.pages_needed(table, jnp.asarray(want), PAGE))
            if need > int(table.free.sum()):
                want[row] = int(np.sum(np.asarray(table.block_tables[row]) >= 0)) * PAGE
                continue
            table = reserve(table, jnp.asarray(want), PAGE)
        else:
            want[row] = 0
            table = release(table, jnp.arange(B) == row)
        tables, free = np.asarray(table.block_tables), np.asarray(table.free)
        owned = tables[tables >= 0]
        assert len(owned) == len(set(owned.tolist())), "a page owned twice"
        assert not free[owned].any(), "an owned page marked free"
        assert len(owned) + free.sum() == P, "a page neither free nor owned"
        for b in range(B):
            assert (tables[b] >= 0).sum() >= -(-want[b] // PAGE)
    table = release(table, jnp.ones(B, bool))
    assert bool(table.free.all()) and bool((table.block_tables < 0).all())


@pytest.mark.parametrize("kv_dtype,mha", [("float32", False), ("int8", False), ("int8", True)])
def test_static_write_attend_equals_write_then_attend(kv_dtype, mha):
    """A decode step's write_attend with the Pallas kernels (one kernel that stores the new key
    while it attends: float caches, and int8 caches with one query head per KV head, where the
    kernel also rounds the new key and value) gives the buffers and output of write, then attend."""
    cfg = LlamaConfig.from_name("tiny")
    if mha:
        cfg = dataclasses.replace(cfg, n_kv_heads=cfg.n_heads)
    B, S, H, G, K = 3, 32, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    keys = jax.random.split(jax.random.key(7), 5)
    cache = init_cache(cfg, B, S, jnp.dtype(kv_dtype))
    # rows 0 and 1 hold 9 and 31 keys; row 2 is full, so its write is dropped
    old_k, old_v = (jax.random.normal(key, (B, S, G, K)) for key in keys[:2])
    first = jnp.zeros((B,), jnp.int32)
    cache = dataclasses.replace(cache, lengths=first)
    layer = cache.write(0, old_k, old_v, jnp.full((B,), S), fresh=True)
    cache = dataclasses.replace(cache, k=[layer[0]] + cache.k[1:], v=[layer[1]] + cache.v[1:],
                                k_scale=None if layer[2] is None else [layer[2]] + cache.k_scale[1:],
                                v_scale=None if layer[3] is None else [layer[3]] + cache.v_scale[1:],
                                lengths=jnp.array([9, 31, S], jnp.int32))
    q = jax.random.normal(keys[2], (B, 1, H, K))
    k, v = (jax.random.normal(key, (B, 1, G, K)) for key in keys[3:])
    n = jnp.ones((B,), jnp.int32)
    pos, theta = cache.lengths[:, None], cfg.rope_theta
    got_layer, got = cache.write_attend(0, q, k, v, pos, n, False, Plan(attn_impl="pallas"), theta)
    q, k = rope(q, pos, theta), rope(k, pos, theta)
    want_layer = cache.write(0, k, v, n, False)
    want = cache.attend(want_layer, q, k, v, n, False, Plan(attn_impl="xla"))
    for a, b in zip(got_layer, want_layer):
        assert (a is None) == (b is None)
        if a is not None:
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert_close(got, want, jnp.float32)
    jaxpr = str(jax.make_jaxpr(lambda c, q, k, v: c.write_attend(0, q, k, v, pos, n, False, Plan(attn_impl="pallas"),
                                                                 theta))(cache, q, k, v))
    assert ("jllm_decode_attention_append" in jaxpr) == (kv_dtype == "float32")
    assert ("jllm_paged_attention_int8_fma_append" in jaxpr) == (kv_dtype == "int8" and mha)
