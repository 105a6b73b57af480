import dataclasses
import gc

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import random_params

import jllm
from jllm.config import LlamaConfig
from jllm.generate import decode, prefill
from jllm.kvcache import init_cache
from jllm.model import init_params, logits, param_infos, transformer
from jllm.plan import Plan
from pallas_kernels.kv_quant import dequantize_kv, quantize_kv
from jllm.model import forward as _forward
from jllm.sampling import Sampling

forward = jax.jit(_forward, static_argnames=("cfg", "plan"))
ATOL = RTOL = 2e-5  # float32 end to end; logits are O(1)

CFGS = {
    "gqa": LlamaConfig.from_name("tiny"),
    "mha": LlamaConfig.from_name("tiny", n_kv_heads=4),
    "mqa_tied": LlamaConfig.from_name("tiny", n_kv_heads=1, tie_embeddings=True),
}


def _tokens(batch: int, seq: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(3, vocab, (batch, seq)).astype(np.int32)


def test_init_cache_shapes_and_dtype(tiny_cfg):
    cache = init_cache(tiny_cfg, batch=3, max_len=40, dtype=jnp.float32)
    assert len(cache.k) == len(cache.v) == tiny_cfg.n_layers
    for buf in cache.k + cache.v:
        assert buf.shape == (3, 40, tiny_cfg.n_kv_heads, tiny_cfg.head_dim)
        assert buf.dtype == jnp.float32
    assert cache.lengths.shape == (3,) and cache.lengths.dtype == jnp.int32
    assert not np.any(np.asarray(cache.lengths))
    assert cache.max_len == 40


def test_init_params_matches_param_infos(tiny_cfg):
    params = init_params(tiny_cfg, jax.random.key(0), jnp.bfloat16)
    flat = jllm.model.to_flat(params)
    infos = param_infos(tiny_cfg)
    assert sorted(flat) == sorted(infos)
    for name, info in infos.items():
        assert flat[name].shape == info.shape and flat[name].dtype == jnp.bfloat16, name
    tied = dataclasses.replace(tiny_cfg, tie_embeddings=True)
    assert init_params(tied, jax.random.key(0)).output is None


@pytest.mark.parametrize("name", list(CFGS))
@pytest.mark.parametrize("batch, seq", [(2, 12)], ids=lambda v: f"{v}")
def test_decode_matches_full_forward(name, batch, seq):
    cfg = CFGS[name]
    params = random_params(cfg)
    tokens = jnp.asarray(_tokens(batch, seq, cfg.vocab_size))
    full, _ = forward(params, tokens, init_cache(cfg, batch, seq, jnp.float32), cfg=cfg)
    cache = init_cache(cfg, batch, seq, jnp.float32)
    steps = []
    for t in range(seq):
        out, cache = forward(params, tokens[:, t:t + 1], cache, cfg=cfg)
        steps.append(out[:, 0])
    np.testing.assert_allclose(np.stack(steps, 1), full, rtol=RTOL, atol=ATOL)
    assert np.asarray(cache.lengths).tolist() == [seq] * batch


@pytest.mark.parametrize("name", ["gqa", "mqa_tied"])
@pytest.mark.parametrize("prompt, new", [(5, 7)], ids=lambda v: f"{v}")
def test_decode_after_prefill_matches_full_forward(name, prompt, new):
    cfg = CFGS[name]
    params = random_params(cfg)
    tokens = jnp.asarray(_tokens(2, prompt + new, cfg.vocab_size, seed=1))
    full, _ = forward(params, tokens, init_cache(cfg, 2, 32, jnp.float32), cfg=cfg)
    cache = init_cache(cfg, 2, 32, jnp.float32)
    h, cache = transformer(params, tokens[:, :prompt], cache, cfg, fresh=True)
    got = [logits(params, h)]
    for t in range(prompt, prompt + new):
        out, cache = forward(params, tokens[:, t:t + 1], cache, cfg=cfg)
        got.append(out)
    np.testing.assert_allclose(np.concatenate(got, 1), full, rtol=RTOL, atol=ATOL)


def test_prefill_and_decode_tokens_are_greedy_continuation(tiny_model):
    """The jitted prefill + decode loop (greedy) picks, at each step, the argmax of a full forward."""
    model, cfg = tiny_model, tiny_model.cfg
    prompt = _tokens(1, 9, cfg.vocab_size, seed=2)
    tokens = np.zeros((1, 16), np.int32)
    tokens[0, :9] = prompt
    sampling = Sampling.make(1)
    first, cache, key = prefill(model.params, jnp.asarray(tokens), jnp.asarray([9], jnp.int32),
                                init_cache(cfg, 1, 64, jnp.float32), sampling, jax.random.key(0), cfg=cfg)
    out, cache, key = decode(model.params, first, cache, sampling, key, cfg=cfg, n_steps=8)
    generated = [int(first[0])] + np.asarray(out[0]).tolist()
    seq = np.concatenate([prompt[0], generated])[None]
    full, _ = forward(model.params, jnp.asarray(seq), init_cache(cfg, 1, seq.shape[1], jnp.float32), cfg=cfg)
    assert np.argmax(np.asarray(full[0, 8:-1]), -1).tolist() == generated
    assert int(cache.lengths[0]) == 9 + 8


def test_prefill_padded_batch_first_logits_match_unpadded(tiny_model):
    model, cfg = tiny_model, tiny_model.cfg
    lengths = [5, 12]
    prompts = [_tokens(1, n, cfg.vocab_size, seed=10 + n)[0] for n in lengths]
    tokens = np.zeros((2, 16), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)] = p
    n_tokens = jnp.asarray(lengths, jnp.int32)
    h, cache = transformer(model.params, jnp.asarray(tokens), init_cache(cfg, 2, 64, jnp.float32), cfg,
                           n_tokens=n_tokens, fresh=True)
    padded = logits(model.params, h[jnp.arange(2), n_tokens - 1])               # [B, V]
    assert np.asarray(cache.lengths).tolist() == lengths
    for i, p in enumerate(prompts):
        cache = init_cache(cfg, 1, len(p), jnp.float32)
        alone, _ = forward(model.params, jnp.asarray(p)[None], cache, cfg=cfg)
        np.testing.assert_allclose(padded[i], alone[0, -1], rtol=RTOL, atol=ATOL)
    first, _, _ = prefill(model.params, jnp.asarray(tokens), n_tokens, init_cache(cfg, 2, 64, jnp.float32),
                          Sampling.make(2), jax.random.key(0), cfg=cfg)
    assert np.asarray(first).tolist() == np.argmax(np.asarray(padded), -1).tolist()


@pytest.mark.parametrize("name", ["gqa", "mqa_tied"])
def test_only_positions_give_those_hidden_states_and_the_same_cache(name):
    cfg = CFGS[name]
    params = init_params(cfg, jax.random.key(3), jnp.float32)
    tokens = jnp.asarray(_tokens(3, 12, cfg.vocab_size, seed=4))
    n_tokens = jnp.asarray([12, 5, 9], jnp.int32)
    only = jnp.asarray([[11, 0], [4, 2], [8, 8]], jnp.int32)
    full, c_full = transformer(params, tokens, init_cache(cfg, 3, 32, jnp.float32), cfg,
                               n_tokens=n_tokens, fresh=True)
    some, c_some = transformer(params, tokens, init_cache(cfg, 3, 32, jnp.float32), cfg,
                               n_tokens=n_tokens, fresh=True, only=only)
    assert some.shape == (3, 2, cfg.dim)
    np.testing.assert_allclose(some, jnp.take_along_axis(full, only[:, :, None], axis=1),
                               rtol=RTOL, atol=ATOL)
    for a, b in zip(jax.tree.leaves(c_full), jax.tree.leaves(c_some)):
        np.testing.assert_array_equal(a, b)


def test_mixed_length_batch_generates_what_each_prompt_does_alone(tiny_model):
    model = tiny_model
    prompts = [_tokens(1, n, model.cfg.vocab_size, seed=20 + n)[0].tolist() for n in (3, 11, 16)]
    batched = jllm.generate(model, prompts, max_new_tokens=24, stop_token_ids=[])  # 4 rows, 1 padding
    assert len(batched) == 3
    for p, got in zip(prompts, batched):
        [alone] = jllm.generate(model, [p], max_new_tokens=24, stop_token_ids=[])
        assert got.tokens == alone.tokens
        assert len(got.tokens) == 24


def _decode_args(model, batch=1, max_len=64):
    cfg = model.cfg
    tokens = np.full((batch, 16), 5, np.int32)
    sampling = Sampling.make(batch)
    empty = init_cache(cfg, batch, max_len, jnp.float32)
    first, cache, key = prefill(model.params, jnp.asarray(tokens), jnp.full((batch,), 4, jnp.int32),
                                empty, sampling, jax.random.key(0), cfg=cfg, plan=Plan())
    assert all(buf.is_deleted() for buf in empty.k + empty.v)  # prefill donates the cache too
    return first, cache, sampling, key


def test_decode_donates_the_cache(tiny_model):
    model, cfg = tiny_model, tiny_model.cfg
    kw = dict(cfg=cfg, n_steps=8, plan=Plan())
    token, cache, sampling, key = _decode_args(model)
    hlo = decode.lower(model.params, token, cache, sampling, key, **kw).compile().as_text()
    assert "input_output_alias" in hlo
    # Every per-layer K and V buffer is aliased to an output.
    alias = hlo[hlo.index("input_output_alias"):].split("\n", 1)[0]
    assert alias.count("alias)") >= 2 * cfg.n_layers, alias
    old = cache
    out, cache, key = decode(model.params, token, cache, sampling, key, **kw)
    assert all(buf.is_deleted() for buf in old.k + old.v)
    assert not cache.k[0].is_deleted()


def test_live_buffers_do_not_grow_over_decode_steps(tiny_model):
    model, cfg = tiny_model, tiny_model.cfg
    kw = dict(cfg=cfg, n_steps=8, plan=Plan())
    token, cache, sampling, key = _decode_args(model)
    counts = []
    for step in range(7):  # 56 steps after a 4-token prompt, within the 64-slot cache
        out, cache, key = decode(model.params, token, cache, sampling, key, **kw)
        token = out[:, -1]
        del out
        gc.collect()
        counts.append(len(jax.live_arrays()))
    assert counts[-1] == counts[1], counts


def test_attention_sees_only_its_own_row_and_past(tiny_cfg):
    """Changing a future token or another row's tokens leaves a position's logits unchanged."""
    cfg = tiny_cfg
    params = random_params(cfg)
    a = _tokens(2, 10, cfg.vocab_size, seed=3)
    b = a.copy()
    b[0, 6:] = (b[0, 6:] + 1) % cfg.vocab_size   # row 0: future of position 5 changes
    b[1] = (b[1] + 7) % cfg.vocab_size            # row 1: everything changes
    la, _ = forward(params, jnp.asarray(a), init_cache(cfg, 2, 10, jnp.float32), cfg=cfg)
    lb, _ = forward(params, jnp.asarray(b), init_cache(cfg, 2, 10, jnp.float32), cfg=cfg)
    np.testing.assert_allclose(la[0, :6], lb[0, :6], rtol=RTOL, atol=ATOL)
    assert not np.allclose(la[0, 6:], lb[0, 6:])


@pytest.mark.parametrize("prompt, new", [(33, 7)], ids=lambda v: f"{v}")
def test_generation_up_to_the_context_end_matches_full_forward(prompt, new):
    """The cache is capped at max_seq_len (40 here) and the last decode chunk runs past it."""
    cfg = LlamaConfig.from_name("tiny", max_seq_len=40)
    model = jllm.Model(params=random_params(cfg), cfg=cfg, attn_impl="xla", matmul_impl="xla")
    p = _tokens(1, prompt, cfg.vocab_size, seed=4)[0].tolist()
    [r] = jllm.generate(model, [p], max_new_tokens=new)
    seq = jnp.asarray([p + r.tokens])
    full, _ = forward(model.params, seq, init_cache(cfg, 1, seq.shape[1], jnp.float32), cfg=cfg)
    assert r.tokens == np.argmax(np.asarray(full[0, prompt - 1:-1]), -1).tolist()
    assert r.finish_reason == "length"


# --- int8 KV cache -------------------------------------------------------------------------------

def test_quantize_kv_error_is_at_most_half_a_step_per_token_and_head():
    x = np.random.default_rng(3).normal(size=(2, 5, 3, 16)).astype(np.float32)
    x[1, 2, 0] = 0  # an all-zero head row: scale 0, codes 0, no division by zero
    q, scale = quantize_kv(jnp.asarray(x))
    assert q.dtype == jnp.int8 and q.shape == x.shape and scale.shape == (2, 3, 5)  # [B, G, T]
    step = np.abs(x).max(-1) / 127                                                  # [B, T, G]
    err = np.abs(np.asarray(dequantize_kv(q, scale, jnp.float32)) - x)
    assert np.all(err <= step[..., None] / 2 * (1 + 1e-6) + 1e-7), err.max()
    codes = np.abs(np.asarray(q)).max(-1)
    assert codes[1, 2, 0] == 0 and float(scale[1, 0, 2]) == 0
    codes[1, 2, 0] = 127
    assert np.all(codes == 127)  # absmax: the largest element of each row uses the full range


def test_init_cache_int8_holds_codes_and_float32_scales(tiny_cfg):
    cache = init_cache(tiny_cfg, batch=2, max_len=16, dtype=jnp.int8)
    assert cache.quantized and len(cache.k_scale) == len(cache.v_scale) == tiny_cfg.n_layers
    assert all(b.dtype == jnp.int8 for b in cache.k + cache.v)
    assert all(s.shape == (2, tiny_cfg.n_kv_heads, 16) and s.dtype == jnp.float32
               for s in cache.k_scale + cache.v_scale)
    assert not init_cache(tiny_cfg, 2, 16, jnp.float32).quantized
    with pytest.raises(ValueError, match="'uint8'"):
        init_cache(tiny_cfg, 2, 16, jnp.uint8)


def test_int8_cache_stores_each_written_key_within_half_a_step(tiny_cfg):
    cfg, params = tiny_cfg, random_params(tiny_cfg)
    tokens = jnp.asarray(_tokens(2, 5, cfg.vocab_size, seed=4))
    _, f32 = forward(params, tokens, init_cache(cfg, 2, 16, jnp.float32), cfg=cfg)
    _, i8 = forward(params, tokens, init_cache(cfg, 2, 16, jnp.int8), cfg=cfg)
    # Layer 0 sees the same input either way (later layers see attention over rounded keys).
    for codes, scale, ref in ((i8.k[0], i8.k_scale[0], f32.k[0]), (i8.v[0], i8.v_scale[0], f32.v[0])):
        ref = np.asarray(ref)
        got = np.asarray(dequantize_kv(codes, scale, jnp.float32))
        step = np.abs(ref).max(-1, keepdims=True) / 127
        assert np.all(np.abs(got - ref) <= step / 2 * (1 + 1e-5) + 1e-7)
    for scale in i8.k_scale + i8.v_scale:  # written positions only
        assert np.all(np.asarray(scale)[:, :, :5] > 0) and not np.any(np.asarray(scale)[:, :, 5:])


@pytest.mark.parametrize("attn_impl", ["xla", "pallas"])
def test_int8_cache_decode_stays_close_to_the_float_cache(attn_impl):
    """Prefill (fresh), then decode steps reading the int8 codes: logits within 2% of the float
    cache's (relative norm) and the same top-1 at every step."""
    cfg = CFGS["gqa"]
    params = random_params(cfg)
    tokens = jnp.asarray(_tokens(2, 16, cfg.vocab_size, seed=5))
    out = {}
    for dtype in (jnp.float32, jnp.int8):
        cache = init_cache(cfg, 2, 32, dtype)
        h, cache = transformer(params, tokens[:, :8], cache, cfg, Plan(attn_impl=attn_impl), fresh=True)
        steps = [logits(params, h[:, -1:])]
        for t in range(8, 16):
            o, cache = forward(params, tokens[:, t:t + 1], cache, cfg=cfg, plan=Plan(attn_impl=attn_impl))
            steps.append(o)
        out[dtype] = np.concatenate(steps, 1)                                      # [B, 9, V]
    ref, got = out[jnp.float32], out[jnp.int8]
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.02
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert not np.array_equal(got, ref)  # the int8 path ran


def test_int8_cache_chunked_prefill_matches_token_by_token(tiny_cfg):
    """A multi-token step over a filled int8 cache (dequantized once) agrees with single steps."""
    cfg, params = tiny_cfg, random_params(tiny_cfg)
    tokens = jnp.asarray(_tokens(2, 12, cfg.vocab_size, seed=6))
    cache = init_cache(cfg, 2, 16, jnp.int8)
    _, cache = forward(params, tokens[:, :6], cache, cfg=cfg)
    chunk, _ = forward(params, tokens[:, 6:], cache, cfg=cfg)
    steps = []
    for t in range(6, 12):
        o, cache = forward(params, tokens[:, t:t + 1], cache, cfg=cfg)
        steps.append(o)
    np.testing.assert_allclose(np.concatenate(steps, 1), chunk, rtol=0, atol=1e-4)
