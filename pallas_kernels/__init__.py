"""Pallas kernels (Triton backend) for jllm: attention and weight-only matmuls.

Each module holds one kernel, its jitted op, a pure-jnp `*_ref` with the same signature, and a
`main()` benchmark. This package imports only jax.
"""
