"""Pallas-Triton backend details shared by the kernels: compiler params and warning filters.

The Triton backend is the one Pallas path that covers both CUDA and ROCm builds of jax. jax 0.11
deprecates it and warns at every Triton lowering; `quiet()` silences exactly those warnings around
our own calls and nothing else.
"""
import contextlib
import threading
import warnings

import jax.numpy as jnp
from jax.experimental.pallas import triton as plgpu


def compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def tf32_ok(x) -> bool:
    """Whether a dot on x may round its inputs to tf32: yes for bf16/f16 (exact in tf32), no for
    float32, where a float32 model must match XLA's float32 attention to ~1e-6, not ~1e-3."""
    return x.dtype != jnp.float32


_QUIET = threading.RLock()  # catch_warnings swaps process-wide state: one block at a time


@contextlib.contextmanager
def quiet():
    """Ignore the Pallas-Triton deprecation warnings raised while tracing or lowering our kernels
    (thread-safe: threads that trace at once, as a threaded compile does, take turns here)."""
    with _QUIET, warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*[Tt]riton.*")
        yield
