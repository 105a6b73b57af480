"""The decode step's tensor-parallel pattern on all visible GPUs, in one on-device loop: a
column-parallel GEMV, a row-parallel GEMV, and the all-reduce of the [1, D] result.

    python -m scripts.gpu allreduce [--dim 8192] [--ffn 28672] [--steps 64]
"""
import functools
import inspect

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from scripts.gpu.common import header
from scripts.gpu.timing import loop_us

try:
    from jax import shard_map
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map


def allreduce(args) -> None:
    """µs per step: the all-reduce alone, the two GEMVs alone, both."""
    header()
    n, dim, ffn = args.steps, args.dim, args.ffn
    devs = jax.devices()
    tp = len(devs)
    mesh = Mesh(devs, ("model",))
    x = jnp.ones((tp, dim), jnp.bfloat16)
    w1 = jnp.full((dim, ffn), 1e-4, jnp.bfloat16)
    w2 = jnp.full((ffn, dim), 1e-4, jnp.bfloat16)
    no_check = ({"check_vma": False} if "check_vma" in inspect.signature(shard_map).parameters
                else {"check_rep": False})

    def chain(x, w1, w2, reduce: bool, matmul: bool):
        def body(i, x):
            y = (x @ w1) @ w2 if matmul else x
            return (jax.lax.psum(y, "model") if reduce else y) * 0.5
        return jax.lax.fori_loop(0, n, body, x)

    for name, red, mm in [("all-reduce", True, False), ("gemvs", False, True), ("gemvs+all-reduce", True, True)]:
        f = jax.jit(shard_map(functools.partial(chain, reduce=red, matmul=mm), mesh=mesh,
                              in_specs=(P("model"), P(None, "model"), P("model", None)),
                              out_specs=P("model"), **no_check))
        us = loop_us(lambda: f(x, w1, w2), n, repeats=10)
        print(f"{tp} devices {name:17s}: {us:8.1f} us per step "
              f"([1, {dim}] @ [{dim}, {ffn // tp}] @ [{ffn // tp}, {dim}] bf16)", flush=True)
