"""Tensor parallelism over jax.sharding meshes: logical axis rules and mesh construction."""
