"""The one timer of the GPU benchmarks: every figure scripts/gpu prints comes from here.

Two ways to time, for two kinds of work:
- `time_us(fn, arg_sets)`: a kernel called the way a model step calls it. One jit runs fn over
  several distinct input sets back to back (so nothing stays in the 50 MB L2 and XLA cannot merge
  calls); each trial dispatches that jit `reps` times asynchronously and syncs once, so host
  dispatch overlaps GPU work. The figure is the median per call, launch gaps included.
- `loop_us(fn, steps)`: fn is a jitted call that runs `steps` steps in one on-device loop (a
  `fori_loop` over GEMVs, a chain of all-reduces); the figure is the fastest of `repeats` calls
  divided by steps, so no host dispatch is left in it.
"""
import time

import jax
from jax.experimental import pallas as pl

L2_BYTES = 50 * 2**20  # H100 and H200


def num_sets(nbytes: int) -> int:
    """Input copies to rotate through so that one pass reads about 5x the L2 (2 to 16 copies)."""
    return max(2, min(16, pl.cdiv(256 * 2**20, nbytes)))


def time_us(fn, arg_sets: list[tuple], trials: int = 15, reps: int = 8) -> float:
    """Median microseconds per call of fn(*args), over the input sets `arg_sets`."""
    many = jax.jit(lambda sets: [fn(*args) for args in sets])
    jax.block_until_ready(many(arg_sets))
    start = time.perf_counter()
    while time.perf_counter() - start < 0.2:  # let the clocks ramp up again after compiling
        jax.block_until_ready(many(arg_sets))
    samples = []
    for _ in range(trials):
        start = time.perf_counter()
        outs = [many(arg_sets) for _ in range(reps)]
        jax.block_until_ready(outs)
        samples.append((time.perf_counter() - start) / (reps * len(arg_sets)))
    samples.sort()
    return samples[len(samples) // 2] * 1e6


def loop_us(fn, steps: int, repeats: int = 5) -> float:
    """Microseconds per step of fn(), a call that runs `steps` steps on the device: the fastest of
    `repeats` calls (after one warm-up), each waited for, divided by steps."""
    jax.block_until_ready(fn())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn())
        best = min(best, time.perf_counter() - start)
    return best / steps * 1e6
