"""The model with its Pallas kernels against the XLA path, compiled on a GPU (`pytest -m gpu`).

Small random Llama shapes in float32 and bf16: logits of a full forward (the prefill kernel), and
logits of 64 teacher-forced decode steps after a prefill (the decode kernel, also over an int8 KV
cache; float weights through the fused Pallas GEMV at batch 1; int4 weights through the DP4A
GEMV) against the XLA path. Teacher
forcing keeps one near-tie from derailing the rest. The kernels alone are checked against their
references in the kernel tests (their `gpu` cases).
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllm import quant
from jllm.config import LlamaConfig, RopeScaling
from jllm.model import forward, init_cache, init_params, to_flat, from_flat
from jllm.plan import Plan
from kernel_checks import gpu_marked_needs_gpu  # noqa: F401 (autouse fixture)

pytestmark = pytest.mark.gpu

# (config, dtype): GQA 4 in float32 with Llama-3.1's RoPE (theta 500000, llama3 scaling over an
# original context of 64, so that the prefill of 300 tokens and the decode steps run past it and
# the kernels rotate with the scaled frequencies), MHA in bf16 with Llama-2's.
MODELS = [
    (LlamaConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=1024, vocab_size=1024, rope_theta=5e5,
                 rope_scaling=RopeScaling("llama3", 8.0, 1.0, 4.0, 64)), jnp.float32),
    (LlamaConfig(dim=1024, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=2048, vocab_size=2048), jnp.bfloat16),
]
IDS = [f"D={c.dim}_G={c.n_kv_heads}_{jnp.dtype(d).name}" for c, d in MODELS]
TOL = {jnp.float32: 1e-4, jnp.bfloat16: 3e-2}  # relative L2 of the logits after decode steps
PREFILL_TOL = {jnp.float32: 1e-4, jnp.bfloat16: 2e-2}
STEPS = 64


def _params(cfg: LlamaConfig, dtype):
    """Random weights rescaled to std 1/sqrt(fan_in), so logits are O(1) and greedy choices decisive."""
    params = init_params(cfg, jax.random.key(0), jnp.float32)  # matrices std 0.02, norms 1
    scaled = jax.tree.map(lambda w: w * (w.shape[0] ** -0.5 / 0.02) if w.ndim == 2 else w, params)
    return jax.tree.map(lambda w: w.astype(dtype), scaled)


def _tokens(cfg: LlamaConfig, batch: int, length: int) -> jax.Array:
    return jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (batch, length)), jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "attn", "mm"), donate_argnames=("cache",))
def _step(params, token, cache, cfg, attn, mm):
    return forward(params, token, cache, cfg, Plan(attn_impl=attn, matmul_impl=mm))


def _stepwise(params, tokens, cfg, cache_dtype, attn, mm) -> jax.Array:
    """Prefill tokens[:, :-STEPS] in one call, then STEPS single-token steps -> logits [B, STEPS, V]."""
    cache = init_cache(cfg, tokens.shape[0], 512, cache_dtype)
    _, cache = forward(params, tokens[:, :-STEPS], cache, cfg, Plan(attn_impl=attn))
    out = []
    for t in range(tokens.shape[1] - STEPS, tokens.shape[1]):
        logits, cache = _step(params, tokens[:, t:t + 1], cache, cfg, attn, mm)
        out.append(logits[:, 0])
    return jnp.stack(out, 1)


def _rel(got, want) -> float:
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))


def _assert_top1_up_to_ties(got, want) -> None:
    """Each step's argmax agrees, or the two candidates were tied within that step's noise (4x
    the RMS logit error): bf16 rounds differently in two GEMVs, so near-ties of a random model
    may swap (60 of 64 steps agreed on an H200). A swap of candidates further apart fails."""
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    a, b = got.argmax(-1), want.argmax(-1)                                       # [..., steps]
    err = np.sqrt(np.mean((got - want) ** 2, -1))
    gap = np.take_along_axis(want, b[..., None], -1)[..., 0] - np.take_along_axis(want, a[..., None], -1)[..., 0]
    bad = (a != b) & (gap > 4 * err)
    assert not bad.any(), f"{int(bad.sum())} steps chose a different token beyond a tie: gaps {gap[bad]}, errors {err[bad]}"


@pytest.mark.parametrize("cfg,dtype", MODELS, ids=IDS)
def test_prefill_logits_pallas_match_xla(cfg, dtype):
    params, tokens = _params(cfg, dtype), _tokens(cfg, 3, 300)
    with jax.default_matmul_precision("highest"):  # XLA's float32 dots on GPU would round to tf32
        out = {impl: forward(params, tokens, init_cache(cfg, 3, 512, dtype), cfg, Plan(attn_impl=impl))[0]
               for impl in ("xla", "pallas")}
    assert _rel(out["pallas"], out["xla"]) < PREFILL_TOL[dtype]


@pytest.mark.parametrize("cfg,dtype", MODELS, ids=IDS)
def test_fresh_prefill_reads_nothing_of_the_cache_past_each_row(cfg, dtype):
    """The compiled flash kernel attends over the cache the prefill writes: a cache full of NaN
    gives exactly the hidden states of a zeroed one (ragged rows), and the written keys are finite."""
    from jllm.model import transformer
    params, tokens = _params(cfg, dtype), _tokens(cfg, 2, 300)
    n_tokens = jnp.asarray([300, 117], jnp.int32)
    out = {}
    for fill in (0.0, jnp.nan):
        cache = init_cache(cfg, 2, 512, dtype)
        cache = dataclasses.replace(cache, k=[jnp.full_like(a, fill) for a in cache.k],
                                    v=[jnp.full_like(a, fill) for a in cache.v])
        h, c = transformer(params, tokens, cache, cfg, Plan(attn_impl="pallas"), n_tokens=n_tokens, fresh=True)
        out[str(fill)] = (np.asarray(h, np.float32), np.asarray(c.k[0][1, :117], np.float32))
    (h0, _), (h1, keys) = out["0.0"], out["nan"]
    assert np.isfinite(keys).all()
    np.testing.assert_array_equal(h1[0], h0[0])
    np.testing.assert_array_equal(h1[1, :117], h0[1, :117])


@pytest.mark.parametrize("cfg,dtype", MODELS, ids=IDS)
@pytest.mark.parametrize("cache", ["model dtype", "int8"])
def test_decode_attention_pallas_matches_xla(cfg, dtype, cache):
    """64 decode steps through the decode kernel against XLA attention over the same cache."""
    params, tokens = _params(cfg, dtype), _tokens(cfg, 3, 300)
    cache_dtype = jnp.int8 if cache == "int8" else dtype
    with jax.default_matmul_precision("highest"):
        want = _stepwise(params, tokens, cfg, cache_dtype, "xla", "xla")
        got = _stepwise(params, tokens, cfg, cache_dtype, "pallas", "xla")
    assert _rel(got, want) < TOL[dtype]
    _assert_top1_up_to_ties(got, want)


@pytest.mark.parametrize("cfg,dtype", MODELS, ids=IDS)
def test_fused_float_gemv_matches_xla(cfg, dtype):
    """matmul_impl="pallas-fused" at batch 1: q/k/v and gate/up as one bits=16 GEMV launch each."""
    params, tokens = _params(cfg, dtype), _tokens(cfg, 1, 300)
    with jax.default_matmul_precision("highest"):
        want = _stepwise(params, tokens, cfg, dtype, "xla", "xla")
        got = _stepwise(params, tokens, cfg, dtype, "xla", "pallas-fused")
    assert _rel(got, want) < TOL[dtype]
    _assert_top1_up_to_ties(got, want)


@pytest.mark.parametrize("group_size", [128, 32])
def test_int4_decode_gemv_matches_xla(group_size):
    """int4 weights at batch 1 in bf16: the fused Pallas GEMVs (integer dot products on int8
    limbs of x, the RMSNorm in their prologue) against XLA's int4 formulation, same weights."""
    cfg, dtype = MODELS[1]
    flat, _ = quant.quantize_flat(dict(to_flat(_params(cfg, dtype))), "int4", group_size)
    params, tokens = from_flat(flat, cfg), _tokens(cfg, 1, 300)
    want = _stepwise(params, tokens, cfg, dtype, "xla", "xla")
    got = _stepwise(params, tokens, cfg, dtype, "xla", "pallas-fused")
    assert _rel(got, want) < TOL[dtype]
    _assert_top1_up_to_ties(got, want)
