"""What an L2 prefetch would save: a GEMV right after its weight was read by another kernel.

Between a decode layer's GEMVs the memory is idle (attention at a short context, the norms, the
launch gaps), and H100/H200 have 50 MB of L2. If a kernel that runs there read the next weight
ahead, the GEMV would find it in L2. Before building that into a kernel, this part measures the
gain with XLA: in one on-device loop over weight copies (each copy read once per pass, enough
copies to flush the L2), per shape and width it times
  - the GEMV alone (cold: its weight comes from HBM),
  - a `max` over the weight alone (the "prefetch": one XLA reduction that reads every byte),
  - the `max` then the GEMV on the same weight (the GEMV waits on the max's result),
and reports the GEMV's time after the read (both - max) against cold. The saving per layer is
what a prefetch hidden in idle time could give at most.
"""
import functools

import jax
import jax.numpy as jnp

from scripts.gpu.common import header
from scripts.gpu.gemv import _pallas, _xla_bf16, group_size_for, loop_time, weight_bytes, weight_sets

SHAPES = {"wo": (4096, 4096), "w2": (11008, 4096), "q/k/v": (4096, 12288)}


def _touch(q, x):
    """A scalar that depends on every byte of q, as int32. Adding x[0, 0] * 0 (a zero XLA cannot
    fold, since x changes every pass of the timing loop) keeps the read inside the loop; XLA fuses
    the add into the reduction, which reads q once."""
    return jnp.max(q + (x[0, 0] * 0).astype(q.dtype)).astype(jnp.int32)


def _after_touch(op):
    def run(x, q, s):
        m = _touch(q, x)
        x = jnp.where(m == -999, x * 2, x)  # never taken; the GEMV must wait for the read
        return op(x, q, s)
    return run


def main(args) -> None:
    header()
    key = jax.random.key(0)
    x = jax.random.normal(key, (1, 4096), jnp.bfloat16)
    rows = []
    for bits in args.bits:
        for name, (k, n) in SHAPES.items():
            g = group_size_for(bits, k)
            ws = weight_sets(key, k, n, bits, g)
            xk = x if k == 4096 else jax.random.normal(key, (1, k), jnp.bfloat16)
            op = _xla_bf16 if bits == 16 else functools.partial(_pallas, bits=bits, group_size=g)
            cold = loop_time(op, xk, ws)
            touch = loop_time(lambda x, q, s: _touch(q, x), xk, ws)
            both = loop_time(_after_touch(op), xk, ws)
            mb = weight_bytes(*ws[0]) / 1e6
            rows.append((bits, name, mb, cold, touch, both))
            print(f"int{bits:<2d} {name:6s} {mb:6.1f} MB  gemv {cold:6.1f} us  max {touch:6.1f} us  "
                  f"max+gemv {both:6.1f} us  gemv after the read {both - touch:6.1f} us", flush=True)
            del ws
    print("\n| weights | shape | MB | GEMV cold µs | read (max) µs | max + GEMV µs | GEMV after the read µs | saved µs |")
    print("|---|---|---|---|---|---|---|---|")
    for bits, name, mb, cold, touch, both in rows:
        print(f"| {'bf16' if bits == 16 else f'int{bits}'} | {name} | {mb:.1f} | {cold:.1f} | {touch:.1f} | "
              f"{both:.1f} | {both - touch:.1f} | {cold - (both - touch):.1f} |")
