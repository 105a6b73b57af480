"""Shared by the kernel tests: the two ways a kernel runs, and its output against its float32 reference.

Each kernel test takes `interpret` from MODES: True runs Pallas interpret mode on the CPU (CI);
False compiles the kernel through Triton and is marked `gpu`, so it runs only under
`pytest -m gpu` (pyproject's addopts deselect it otherwise). A gpu-marked test on a machine
without a GPU fails (gpu_marked_needs_gpu) rather than skipping: `pytest -m gpu` passing there
would claim a check that never ran.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

MODES = [pytest.param(True, id="interpret"), pytest.param(False, id="compiled", marks=pytest.mark.gpu)]
GPU = pytest.mark.gpu  # a case too large for interpret mode: compiled only

# (relative L2, max abs) per input dtype.
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (1e-2, 3e-2)}


@pytest.fixture(autouse=True)
def gpu_marked_needs_gpu(request):
    """Fails a gpu-marked test up front when jax has no GPU (import this into the test module)."""
    if request.node.get_closest_marker("gpu") is not None and jax.default_backend() != "gpu":
        pytest.fail(f"marked gpu but jax.default_backend()={jax.default_backend()!r}: run `pytest -m gpu` "
                    f"on a machine with a GPU", pytrace=False)


def reference(fn, *args, **kwargs):
    """fn(*args, **kwargs) with float32 dots at full precision (XLA on a GPU rounds them to tf32
    by default; the CPU is exact either way)."""
    with jax.default_matmul_precision("highest"):
        return fn(*args, **kwargs)


def assert_close(out, ref, dtype) -> None:
    """No NaN where the reference is finite (interpret mode fills unwritten outputs with NaN),
    relative L2 error and max abs error within TOL[dtype]."""
    out = np.asarray(out.astype(jnp.float32))
    ref = np.asarray(ref.astype(jnp.float32))
    assert not np.isnan(out[np.isfinite(ref)]).any(), "unwritten or NaN-contaminated output"
    rel_tol, abs_tol = TOL[dtype]
    rel = np.linalg.norm(out - ref) / max(np.linalg.norm(ref), 1e-30)
    assert rel <= rel_tol, f"{rel=}"
    np.testing.assert_allclose(out, ref, atol=abs_tol, rtol=0)
