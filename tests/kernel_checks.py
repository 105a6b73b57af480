"""Shared check for the kernel tests: a kernel's output against its float32 reference."""
import jax.numpy as jnp
import numpy as np

# (relative L2, max abs) per input dtype.
TOL = {jnp.float32: (1e-5, 1e-4), jnp.bfloat16: (1e-2, 3e-2)}


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
