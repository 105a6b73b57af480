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
from jllm.config import LlamaConfig
from jllm.kvcache import init_cache, init_paged_cache, release, reserve
from jllm.model import logits, transformer
from jllm.plan import Plan

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
