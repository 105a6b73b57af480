"""Compile one decode step of a named config and report what the optimized HLO does per step:
copies of KV-cache-sized buffers (there should be none: the cache is updated in place) and the
number of kernels launched per step, by kind.

    python -m scripts.gpu hlo --config llama-2-7b [--batch 1] [--cache-len 512] [--attn-impl xla]
"""
import collections
import os
import re


def hlo(args) -> None:
    import jax
    import jax.numpy as jnp

    from jllm.plan import make_plan
    from jllm.config import LlamaConfig
    from jllm.generate import decode
    from jllm.model import init_cache, init_params
    from jllm.sampling import Sampling

    cfg = LlamaConfig.from_name(args.config)
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0), jnp.bfloat16))
    cache = jax.eval_shape(lambda: init_cache(cfg, args.batch, args.cache_len, jnp.bfloat16))
    token = jax.ShapeDtypeStruct((args.batch,), jnp.int32)
    text = decode.lower(params, token, cache, Sampling.make(args.batch), jax.random.key(0), cfg=cfg,
                        n_steps=1, plan=make_plan(cfg, None, args.attn_impl)).compile().as_text()
    if args.dump:  # a temporary file, then a rename: never a half-written dump
        with open(args.dump + ".tmp", "w") as f:
            f.write(text)
        os.replace(args.dump + ".tmp", args.dump)
    cache_dims = f"{args.batch},{args.cache_len},{cfg.n_kv_heads},{cfg.head_dim}"
    copies = [line.strip()[:160] for line in text.splitlines()
              if re.search(r"= \w+\[" + cache_dims + r"\]\S* copy\(", line)]
    entry = text[text.index("ENTRY"):] if "ENTRY" in text else text
    kinds = collections.Counter()
    for line in text.splitlines():
        m = re.search(r"= \S+ (fusion|custom-call|copy|dynamic-update-slice|scatter|while|conditional)\(", line)
        if m and "fused_computation" not in line.split("=")[0]:
            kinds[m.group(1)] += 1
    print(f"{args.config} B={args.batch} S={args.cache_len}: {len(copies)} copies of cache-sized buffers")
    for c in copies[:8]:
        print("  ", c)
    print("ops in the module (all computations):", dict(kinds))
    print("input_output_alias present:", "input_output_alias" in entry or "input_output_alias" in text)
