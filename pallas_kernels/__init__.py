"""Pallas kernels (Triton backend) for jllm: attention and weight-only matmuls.

Each kernel module holds one kernel, its jitted op and a pure-jnp float32 `*_ref` with the same
signature, nothing else; `split_k` is the skeleton the decode and paged kernels share, `kv_quant`
the int8 KV cache's rounding. Benchmarks live in scripts/gpu (`python -m scripts.gpu PART`). This
package imports only jax.
"""
