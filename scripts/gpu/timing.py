"""The one timer of the GPU benchmarks: every figure scripts/gpu prints comes from here.

Two ways to time, for two kinds of work:
- `time_us(fn, arg_sets)`: a kernel called the way a model step calls it. One jit runs fn over
  several distinct input sets back to back (so nothing stays in the 50 MB L2 and XLA cannot merge
  calls); each trial dispatches that jit `reps` times asynchronously and syncs once, so host
  dispatch overlaps GPU work. The figure is the median per call, launch gaps included.
- `loop_us(fn, steps)`: fn is a jitted call that runs `steps` steps in one on-device loop (a
  `fori_loop` over GEMVs, a chain of all-reduces); the figure is the fastest of `repeats` calls
  divided by steps, so no host dispatch is left in it. `loop_time_us(fn, arg_sets)` builds such a
  loop over fn and input sets: a kernel whose call is shorter than the dispatch floor of
  `time_us` (about 18-20 µs on an H200) measures itself there, as between a model's layers.
"""
import time

import jax
import jax.numpy as jnp
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


def loop_time_us(fn, arg_sets: list[tuple], iters: int = 20) -> float:
    """Microseconds per call of fn(*args): one jitted `fori_loop` of `iters` passes, each calling
    fn on every input set in turn. Each call's first argument is scaled by 1 + 0 * i (a traced
    zero), so XLA hoists no call out of the loop; that costs one small elementwise kernel per call
    on the first argument (q for attention), which a model step also has before its kernel."""
    @jax.jit
    def run(sets, zero):
        def body(i, outs):
            step = (1 + zero * i).astype(jnp.float32)
            return [fn((args[0] * step).astype(args[0].dtype), *args[1:]) for args in sets]
        init = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(body, 0, None))
        return jax.lax.fori_loop(0, iters, body, init)

    zero = jnp.float32(0)
    return loop_us(lambda: run(arg_sets, zero), iters * len(arg_sets))


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
