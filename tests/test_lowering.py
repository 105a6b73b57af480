"""The named configs' full-size programs lower for CUDA with every Pallas kernel on this CPU (no
GPU, nothing allocated): the kernels' wrappers, block-size checks and Triton lowering see the
real shapes (Llama-3.1-8B: GQA 4, FFN 14336, vocabulary 128256; Llama-3.2-3B: GQA 3)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllm import quant
from jllm.config import LlamaConfig
from jllm.generate import _prefill, decode
from jllm.kvcache import init_cache
from jllm.model import from_flat, param_infos
from jllm.plan import make_plan
from jllm.sampling import Sampling


def _lower(fn, static, *args, **kw):
    """HLO text of fn (a jitted function, or made one with these static arguments) for CUDA."""
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn, static_argnames=static)
    return jitted.trace(*args, **kw).lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.parametrize("name,mode,kv", [("llama-3.1-8b", "int4", "int8"), ("llama-3.1-8b", None, None),
                                          ("llama-3.2-3b", "int8", None)])
def test_decode_and_prefill_lower_for_cuda_with_the_kernels(name, mode, kv):
    cfg = LlamaConfig.from_name(name)
    flat = quant.abstract_flat({n: i.shape for n, i in param_infos(cfg).items()}, jnp.bfloat16, mode,
                               128 if mode == "int4" else None)
    params = jax.eval_shape(lambda f: from_flat(f, cfg), flat)
    plan = dataclasses.replace(make_plan(cfg, None, "pallas", "pallas-fused"), interpret=False)
    B = 1
    cache = jax.eval_shape(lambda: init_cache(cfg, B, 2304, kv or jnp.bfloat16))
    samp = Sampling(jnp.zeros(B), jnp.zeros(B, jnp.int32), jnp.ones(B), jnp.zeros(B), greedy=True)
    key = jax.eval_shape(lambda: jax.random.key(0))
    hlo = _lower(decode, ("cfg", "n_steps", "plan", "logprobs"), params, jax.ShapeDtypeStruct((B,), jnp.int32),
                 cache, samp, key, cfg=cfg, n_steps=1, plan=plan)
    assert "__gpu$xla.gpu.triton" in hlo   # the Pallas kernels are in the program
    _lower(_prefill, ("cfg", "plan", "logprobs"), params, jax.ShapeDtypeStruct((B, 2048), jnp.int32),
           jax.ShapeDtypeStruct((B,), jnp.int32), cache, samp, key, cfg=cfg, plan=plan)


@pytest.mark.parametrize("kv", [None, "int8"])
def test_engine_step_lowers_for_cuda_with_the_paged_kernels(kv):
    """Llama-3.1-8B's engine step at 256 decode rows and a 768-token chunk part over 16-token
    pages (the paged decode kernel and the multi-query chunk kernel, GQA 4)."""
    from jllm.engine.scheduler import Schedule, StepShapes, build_batch
    from jllm.engine.step import engine_step, init_state

    cfg = LlamaConfig.from_name("llama-3.1-8b")
    params = jax.eval_shape(lambda: from_flat(quant.abstract_flat(
        {n: i.shape for n, i in param_infos(cfg).items()}, jnp.bfloat16, None), cfg))
    plan = dataclasses.replace(make_plan(cfg, None, "pallas", "pallas-fused"), interpret=False)
    max_seqs, num_pages, page_size, max_pages = 256, 8192, 16, 96
    state = jax.eval_shape(lambda: init_state(cfg, num_pages, page_size, max_seqs, kv or jnp.bfloat16,
                                              max_pages=max_pages))
    shapes = StepShapes((256,), (768,), 128, 4)
    tables = np.full((max_seqs, max_pages), -1, np.int32)
    batch, _ = build_batch(Schedule([], [], []), shapes, tables, num_pages, max_seqs, page_size, dims=(256, 768))
    hlo = _lower(engine_step, ("cfg", "plan", "greedy", "prompt_logprobs"), params, state, batch,
                 cfg=cfg, plan=plan, greedy=False)
    assert "__gpu$xla.gpu.triton" in hlo


def test_speculative_verify_and_a_small_draft_lower_for_cuda():
    """Llama-3.1-8B verifying k + 1 = 5 positions, and Llama-3.2-1B (same vocabulary, tied
    embeddings) drafting 4 tokens, with the kernels: what a 1B/8B speculative pair runs."""
    from jllm import speculative as sp

    B, S, k = 1, 512, 4
    key = jax.eval_shape(lambda: jax.random.key(0))
    greedy = Sampling(jnp.zeros(B), jnp.zeros(B, jnp.int32), jnp.ones(B), jnp.zeros(B), greedy=True)
    i32 = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.int32)  # noqa: E731
    for name in ("llama-3.1-8b", "llama-3.2-1b"):
        cfg = LlamaConfig.from_name(name)
        params = jax.eval_shape(lambda: from_flat(quant.abstract_flat(
            {n: i.shape for n, i in param_infos(cfg).items()}, jnp.bfloat16, None), cfg))
        plan = dataclasses.replace(make_plan(cfg, None, "pallas", "pallas-fused"), interpret=False)
        cache = jax.eval_shape(lambda: init_cache(cfg, B, S, jnp.bfloat16))
        if name == "llama-3.1-8b":
            hlo = _lower(sp.verify, None, params, i32(B), i32(B, k), i32(B), None,
                         jax.ShapeDtypeStruct((B,), bool), cache, greedy, key, cfg=cfg, plan=plan)
        else:
            hlo = _lower(sp.draft_tokens, None, params, i32(B, 2), i32(B), cache, greedy, key, cfg=cfg,
                         plan=plan, k=k)
        assert "__gpu$xla.gpu.triton" in hlo, name
