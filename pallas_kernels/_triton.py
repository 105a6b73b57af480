"""Pallas-Triton backend details shared by the kernels: compiler params and warning filters.

The Triton backend is the one Pallas path that covers both CUDA and ROCm builds of jax. jax 0.11
deprecates it and warns at every Triton lowering; `quiet()` silences exactly those warnings around
our own calls and nothing else.
"""
import contextlib
import warnings

from jax.experimental.pallas import triton as plgpu


def compiler_params(num_warps: int, num_stages: int):
    return plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages)


@contextlib.contextmanager
def quiet():
    """Ignore the Pallas-Triton deprecation warnings raised while tracing or lowering our kernels."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*[Tt]riton.*")
        yield
