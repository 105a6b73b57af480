"""Time the decode step's tensor-parallel pattern on all visible GPUs, in one on-device loop:
a column-parallel GEMV, a row-parallel GEMV, and the all-reduce of the [1, D] result.

    python scripts/allreduce_probe.py   # us per step: all-reduce alone, GEMVs alone, both
"""
import functools
import inspect
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import Mesh, PartitionSpec as P  # noqa: E402

from jllm.bench import best_time  # noqa: E402

try:
    from jax import shard_map
except ImportError:  # older jax
    from jax.experimental.shard_map import shard_map


def main(n: int = 64, dim: int = 8192, ffn: int = 28672):
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

    for name, red, mm in [("all-reduce", True, False), ("gemvs", False, True),
                          ("gemvs+all-reduce", True, True)]:
        f = jax.jit(shard_map(functools.partial(chain, reduce=red, matmul=mm), mesh=mesh,
                              in_specs=(P("model"), P(None, "model"), P("model", None)),
                              out_specs=P("model"), **no_check))
        t = best_time(lambda: f(x, w1, w2), 10)
        print(f"{tp} devices {name:17s}: {t / n * 1e6:8.1f} us per step "
              f"([1, {dim}] @ [{dim}, {ffn // tp}] @ [{ffn // tp}, {dim}] bf16)", flush=True)


if __name__ == "__main__":
    main()
