"""What a generate run costs: device memory for its batch, and time spent compiling."""
import math
import threading
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax import monitoring

from jllm.config import LlamaConfig

# Of the free device memory, the part a run plans to use; the rest absorbs allocator
# fragmentation and the small buffers the estimates leave out.
FREE_MEMORY_FRACTION = 0.9

# jax.monitoring time spans of tracing, lowering to MLIR and compiling (or loading a compiled
# program from the persistent cache); the names are the same in jax 0.10 and 0.11.
COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")


def cache_bytes(cfg: LlamaConfig, B: int, S: int, dtype, mesh: jax.sharding.Mesh | None = None) -> int:
    """Bytes of `init_cache(cfg, B, S, dtype)` on one device (a mesh's shard of it): k and v
    [B, S, G, K] per layer, an int8 cache's float32 scales [B, G, S] per layer, lengths [B]."""
    shape = (B, S, cfg.n_kv_heads, cfg.head_dim)
    if mesh is not None:
        from jllm import parallel  # sharded runs only
        shape = parallel.cache_shardings(cfg, mesh).k[0].shard_shape(shape)
    b, s, g, k = shape
    dtype = jnp.dtype(dtype)
    scale = 4 if dtype == jnp.int8 else 0
    return 2 * cfg.n_layers * b * s * g * (k * dtype.itemsize + scale) + 4 * b


def prefill_bytes(cfg: LlamaConfig, B: int, T: int, dtype, attn_impl: str, n_devices: int = 1) -> int:
    """A rough size of prefill's largest intermediates on one device: the SwiGLU activations
    [B, T, F] (three) and a few [B, T, D], XLA attention's float32 scores [B, H, T, T], and the
    float32 logits [B, V]. A mesh splits the batch, the heads and F over its devices."""
    item = jnp.dtype(dtype).itemsize
    row = T * (3 * cfg.ffn_dim + 4 * cfg.dim) * item + 4 * cfg.vocab_size
    if attn_impl == "xla":
        row += 4 * cfg.n_heads * T * T
    return -(-B * row // n_devices)


def free_device_bytes(mesh: jax.sharding.Mesh | None = None, devices=None) -> int | None:
    """FREE_MEMORY_FRACTION of the least free memory among the devices a run uses: jax's default
    device, or the mesh's. None when a device does not report it (CPU), and in a multi-process run,
    where every process must split a batch the same way."""
    if devices is None:
        if jax.process_count() > 1:
            return None
        devices = jax.local_devices()[:1] if mesh is None else list(mesh.devices.flat)
    free = []
    for d in devices:
        stats = d.memory_stats()
        if not stats or "bytes_limit" not in stats:
            return None
        free.append(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    return int(min(free) * FREE_MEMORY_FRACTION)


def rows_that_fit(n: int, run_bytes: Callable[[int], int], budget: int | None) -> int:
    """How many of n prompts one run takes: n when their run fits `budget` bytes (or the budget is
    unknown), else the largest power of two below n whose run fits; 0 when not even one fits."""
    if budget is None or run_bytes(n) <= budget:
        return n
    fits, k = 0, 1
    while k < n and run_bytes(k) <= budget:
        fits, k = k, 2 * k
    return fits


def span_seconds(spans: list[tuple[float, float]], a: float = -math.inf, b: float = math.inf) -> float:
    """Seconds of [a, b] covered by the union of `spans` (nested spans count once)."""
    total, end = 0.0, a
    for s, e in sorted((max(s, a), min(e, b)) for s, e in spans):
        if e > s and e > end:
            total += e - max(s, end)
            end = e
    return total


class CompileClock:
    """While entered, records the perf_counter spans this thread spends in jax compilation."""

    def __init__(self):
        self.spans: list[tuple[float, float]] = []
        self._thread = threading.get_ident()

    def _listen(self, event: str, start: float, end: float, **kwargs) -> None:
        # Called as the span ends, on the compiling thread; another thread's compilations are not ours.
        if event in COMPILE_EVENTS and threading.get_ident() == self._thread:
            now = time.perf_counter()
            self.spans.append((now - (end - start), now))

    def __enter__(self) -> "CompileClock":
        monitoring.register_event_time_span_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        monitoring.unregister_event_time_span_listener(self._listen)

    def seconds(self, a: float = -math.inf, b: float = math.inf) -> float:
        """Compile seconds inside [a, b] (perf_counter times)."""
        return span_seconds(self.spans, a, b)
