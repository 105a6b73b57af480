"""What the kernel benchmarks share besides the timer: the header, the error measure, the tiling sweep."""
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import _triton
from scripts.gpu.timing import time_us

PEAK_TBS = 3.13  # measured H100 80GB HBM3 read bandwidth (the records in docs/ were taken there)


def header() -> None:
    print(f"jax {jax.__version__} on {jax.devices()[0].device_kind}", flush=True)


def rel_err(out: jax.Array, ref: jax.Array) -> float:
    """Relative L2 error of out against ref, in float32."""
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    return float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))


def best_config(name: str, kernel, configs: list, args: tuple, ref: jax.Array, arg_sets: list,
                rate, timer=time_us) -> tuple | None:
    """For each tiling (None: the default), check kernel(*args, block_sizes=cfg) against ref and time
    it over arg_sets with `timer` (timing.time_us or timing.loop_time_us), printing one line each
    (`rate(us)` formats the throughput). Returns the fastest (us, rel err, cfg), or None when every
    tiling failed."""
    best = None
    for cfg in configs:
        op = functools.partial(kernel, block_sizes=cfg)
        try:
            with _triton.quiet():
                err = rel_err(op(*args), ref)
                us = timer(op, arg_sets)
        except Exception as e:  # a tiling that fails to compile is reported, and the sweep goes on
            print(f"{name} {cfg}: FAILED {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        print(f"{name} {cfg or 'default'}: {us:8.1f} us {rate(us)} err {err:.2e}", flush=True)
        if best is None or us < best[0]:
            best = (us, err, cfg)
    return best
