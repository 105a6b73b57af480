"""Correctness on the accelerator: the model with Pallas kernels against the XLA path.

Small random Llama shapes in float32 and bf16: logits of a full forward (the prefill kernel), and
logits of 64 teacher-forced decode steps (the decode kernel, also over an int8 KV cache; int8/int4
weights through the Pallas matmul, one launch per weight and fused; float weights fused) against the
XLA path. Prints one line per check and exits non-zero on a failure.

    python scripts/gpu_check.py
"""
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from jllm import quant
    from jllm.config import LlamaConfig
    from jllm.model import forward, from_flat, init_cache, param_infos, to_flat

    # XLA's float32 dots on GPU round to tf32 by default; the float32 reference must not.
    jax.config.update("jax_default_matmul_precision", "highest")
    failures = 0

    @functools.partial(jax.jit, static_argnames=("cfg", "attn", "mm"), donate_argnames=("cache",))
    def step(params, tok, cache, cfg, attn, mm):
        return forward(params, tok, cache, cfg, attn_impl=attn, matmul_impl=mm)

    def stepwise(params, tokens, cfg, dtype, attn, mm, n=64):
        """Prefill tokens[:, :-n] in one call, then n single-token steps -> logits [B, n, V].
        dtype is the cache's (int8: an int8 KV cache)."""
        cache = init_cache(cfg, tokens.shape[0], 512, dtype)
        _, cache = forward(params, tokens[:, :-n], cache, cfg, attn_impl=attn)
        out = []
        for t in range(tokens.shape[1] - n, tokens.shape[1]):
            logits, cache = step(params, tokens[:, t:t + 1], cache, cfg, attn, mm)
            out.append(logits[:, 0])
        return jnp.stack(out, 1)

    def report(name, ok, detail):
        nonlocal failures
        failures += not ok
        print(f"{'PASS' if ok else 'FAIL'} {name}: {detail}", flush=True)

    for cfg, dtype in [(LlamaConfig(dim=512, n_layers=2, n_heads=8, n_kv_heads=2, ffn_dim=1024,
                                    vocab_size=1024, max_seq_len=2048), jnp.float32),
                       (LlamaConfig(dim=1024, n_layers=2, n_heads=8, n_kv_heads=8, ffn_dim=2048,
                                    vocab_size=2048, max_seq_len=2048), jnp.bfloat16)]:
        rng = np.random.default_rng(0)
        flat = {n: jnp.asarray((1 + rng.normal(0, 0.1, i.shape)) if i.init == "ones"
                               else rng.normal(0, i.shape[0] ** -0.5 if n != "tok_embeddings" else 1,
                                               i.shape), dtype)
                for n, i in param_infos(cfg).items()}
        params = from_flat(flat, cfg)
        tag = f"D={cfg.dim} G={cfg.n_kv_heads} {jnp.dtype(dtype).name}"
        tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (3, 300)), jnp.int32)
        out = {}
        for impl in ("xla", "pallas"):
            out[impl], _ = forward(params, tokens, init_cache(cfg, 3, 512, dtype), cfg, attn_impl=impl)
        err = float(jnp.linalg.norm(out["pallas"] - out["xla"]) / jnp.linalg.norm(out["xla"]))
        report(f"prefill logits pallas vs xla ({tag})", err < (1e-4 if dtype == jnp.float32 else 2e-2), f"rel err {err:.2e}")
        # Decode: teacher-forced steps after a prefill, so one near-tie cannot derail the rest.
        ref = stepwise(params, tokens, cfg, dtype, "xla", "xla")
        # The int8 cache: the decode kernel reading codes and scales against XLA over the same cache.
        got = stepwise(params, tokens, cfg, jnp.int8, "pallas", "xla")
        base = stepwise(params, tokens, cfg, jnp.int8, "xla", "xla")
        err = float(jnp.linalg.norm(got - base) / jnp.linalg.norm(base))
        drift = float(jnp.linalg.norm(base - ref) / jnp.linalg.norm(ref))
        report(f"int8 KV cache decode attention vs xla, 64 decode steps ({tag})",
               err < (1e-4 if dtype == jnp.float32 else 3e-2), f"rel err {err:.2e} (int8 vs {jnp.dtype(dtype).name} cache: {drift:.2e})")
        quantized = {mode: from_flat(quant.quantize_flat(dict(to_flat(params)), mode)[0], cfg)
                     for mode in ("int8", "int4")}
        for attn, mm, p, what in [("pallas", "xla", params, "decode attention"),
                                  ("xla", "pallas-fused", params, "float weights fused GEMV (batch 1)")] + [
                ("xla", impl, quantized[mode], f"{mode} Pallas matmul{' fused' * (impl != 'pallas')} (batch 1)")
                for mode in ("int8", "int4") for impl in ("pallas", "pallas-fused")]:
            toks = tokens if mm == "xla" else tokens[:1]  # batch 1: the GEMV path of the kernel
            got = stepwise(p, toks, cfg, dtype, attn, mm)
            base = ref if mm == "xla" else stepwise(p, toks, cfg, dtype, "xla", "xla")
            err = float(jnp.linalg.norm(got - base) / jnp.linalg.norm(base))
            agree = float(jnp.mean(jnp.argmax(got, -1) == jnp.argmax(base, -1)))
            tol = 1e-4 if dtype == jnp.float32 else 3e-2
            report(f"{what} vs xla, 64 decode steps ({tag})", err < tol and agree >= 0.97,
                   f"rel err {err:.2e}, argmax agreement {agree:.1%}")
    print(f"{failures} failures on {jax.devices()[0].device_kind}, jax {jax.__version__}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
