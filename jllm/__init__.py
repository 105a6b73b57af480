"""jllm: Llama-2 inference in JAX.

    model = jllm.load("path/to/checkpoint")          # ours, or a Hugging Face Llama directory
    [result] = jllm.generate(model, "Once upon a time", max_new_tokens=64)
"""
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jllm import checkpoint, hf, parallel, plan, quant, runtime
from jllm.config import CONFIGS, LlamaConfig
from jllm import speculative as _speculative  # `speculative` is also generate's argument
from jllm.generate import Completion, Delta, Model, check_impls, check_kv_cache_dtype
from jllm.guided import Guided
from jllm.generate import generate as _generate
from jllm.model import from_flat, param_infos
from jllm.tokenizer import find_tokenizer

__all__ = ["CONFIGS", "Completion", "Guided", "LlamaConfig", "Model", "generate", "load"]

runtime.quiet_triton_deprecation()


def load(path: str | os.PathLike, dtype: str | None = None, *, quantize: str | None = None,
         group_size: int | None = None, attn_impl: str | None = None,
         matmul_impl: str | None = None, progress: bool = True,
         mesh: jax.sharding.Mesh | None = None,
         prompt_buckets: tuple[int, ...] | None = None,
         kv_cache_dtype: str | None = None) -> Model:
    """Load a jllm checkpoint, or convert a Hugging Face Llama directory in memory (`~` expands).

    dtype: "bfloat16" | "float16" | "float32" (default: the checkpoint's). quantize: "int8" |
    "int4" quantizes the linear weights after loading (group_size for int4, default 128); a
    checkpoint converted with --quantize is already quantized. attn_impl/matmul_impl: "xla" |
    "pallas" (default: pallas on GPU, xla elsewhere); matmul_impl "pallas-fused" (the GPU default)
    also runs q/k/v and gate/up as one kernel launch each. prompt_buckets: padded prompt lengths
    (default: powers of two), each compiled once. mesh (sharding.rules.make_mesh): each weight
    is restored straight into its shards on the mesh, each process reading only the shards of its
    own devices. kv_cache_dtype: "int8" keeps the KV cache as int8 with per-token, per-head
    scales (half the bytes decode reads at long context); default the weights' dtype.
    """
    runtime.enable_compilation_cache()
    quant.check_mode(quantize, group_size)
    check_kv_cache_dtype(kv_cache_dtype)
    check_impls(attn_impl, matmul_impl)
    path = os.path.expanduser(os.fspath(path))
    say = runtime.say if progress else (lambda msg: None)
    tok_path = find_tokenizer(path) if os.path.isdir(path) else None
    # A directory that does not exist is neither: read_meta refuses it.
    if not os.path.isfile(os.path.join(path, checkpoint.META)) and os.path.isfile(os.path.join(path, "config.json")):
        cfg = hf.read_config(path)
        shardings = None if mesh is None else parallel.param_shardings(cfg, mesh)

        def place(name, w):
            if shardings is None:
                return jnp.asarray(w)
            # Each process puts only its devices' slices.
            return jax.make_array_from_callback(w.shape, shardings[name], lambda idx: w[idx])
        # Each tensor goes to the device as soon as it is converted: host memory holds one at a time.
        cfg, flat, tok_path = hf.load_hf(path, dtype or "bfloat16", progress=progress, place=place)
        stored = None
    else:
        cfg, meta = checkpoint.read_meta(path)
        dt = checkpoint.parse_dtype(dtype, default=meta["dtype"])
        stored = meta.get("quant") or None
        mode, gs = (stored["mode"], stored.get("group_size")) if stored else (None, None)
        shardings = None if mesh is None else parallel.param_shardings(cfg, mesh, quant=mode, group_size=gs)
        shapes = {name: info.shape for name, info in param_infos(cfg).items()}
        target = quant.abstract_flat(shapes, dt, mode, gs, shardings)
        flat = checkpoint.restore(path, target, progress=say)
    if quantize is not None and stored is not None and stored["mode"] != quantize:
        raise ValueError(f"{path!r} is stored as {stored['mode']}; cannot load it as {quantize}")
    if group_size is not None and stored is not None and (stored.get("group_size") or 128) != group_size:
        raise ValueError(f"{path!r} is stored as int4 in groups of {stored.get('group_size') or 128}; "
                         f"cannot load it with group_size={group_size}")
    if quantize is not None and stored is None:
        say(f"quantizing linear weights to {quantize}")
        flat, err = quant.quantize_flat(flat, quantize, group_size, progress=progress)
        say(f"largest absolute weight error {err:.3g}")
        stored = {"mode": quantize, "group_size": group_size}
        if mesh is not None:
            flat = parallel.shard_flat(flat, cfg, mesh)
    params = from_flat(flat, cfg)
    tokenizer = hf.load_tokenizer(tok_path, cfg) if tok_path else None
    return Model(params=params, cfg=cfg, tokenizer=tokenizer, quant=stored and stored["mode"],
                 attn_impl=attn_impl or plan.default_attn_impl(),
                 matmul_impl=matmul_impl or plan.default_matmul_impl(), mesh=mesh,
                 prompt_buckets=None if prompt_buckets is None else tuple(prompt_buckets),
                 kv_cache_dtype=kv_cache_dtype)


def generate(model: Model, prompts, *, max_new_tokens: int, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, seed: int = 0, stop=None,
             stop_token_ids=None, stream: Callable[[Delta], None] | None = None,
             speculative: "_speculative.Speculative | None" = None, presence_penalty: float = 0.0,
             frequency_penalty: float = 0.0, repetition_penalty: float = 1.0,
             logit_bias: dict[int, float] | None = None, logprobs: int | None = None,
             min_p: float | None = None, guided: Guided | None = None) -> list[Completion]:
    """Generate a completion for each prompt: `jllm.generate.generate` (arguments, results and
    errors as documented there). speculative: a `jllm.speculative.Speculative` (a proposer and k)
    drafts and verifies k tokens per target step; greedy output is unchanged, sampled output keeps
    its distribution, and Completion.stats report the acceptance."""
    kw = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
              min_p=min_p, seed=seed, stop=stop, stop_token_ids=stop_token_ids, stream=stream)
    if speculative is None:
        return _generate(model, prompts, presence_penalty=presence_penalty,
                         frequency_penalty=frequency_penalty, repetition_penalty=repetition_penalty,
                         logit_bias=logit_bias, logprobs=logprobs, guided=guided, **kw)
    if guided is not None:
        raise ValueError(f"guided={getattr(guided, 'kind', guided)!r}: guided decoding is not supported with "
                         "speculative decoding (pass guided=None, or generate without speculative)")
    if logprobs is not None:
        raise ValueError(f"logprobs={logprobs!r}: logprobs are not supported with speculative decoding "
                         "(pass logprobs=None, or generate without speculative)")
    if presence_penalty or frequency_penalty or repetition_penalty != 1 or logit_bias:
        raise ValueError(f"presence_penalty={presence_penalty!r}, frequency_penalty={frequency_penalty!r}, "
                         f"repetition_penalty={repetition_penalty!r}, logit_bias: penalties and biases are not "
                         "supported with speculative decoding (set them to 0, 0, 1 and None)")
    return _speculative.generate(model, prompts, speculative, **kw)
