"""Process-wide setup: the persistent compilation cache and the Pallas-Triton warning filter."""
import os
import warnings

import jax


def quiet_triton_deprecation() -> None:
    """jax 0.11 deprecates Pallas-Triton and warns at every Triton lowering, i.e. at each compile of
    a step that holds one of our kernels. The kernels are Triton by choice (pallas_kernels/README.md),
    so the package ignores exactly those warnings, once, when it is imported."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*[Tt]riton.*")


def enable_compilation_cache(path: str | None = None) -> str | None:
    """Turn on jax's persistent compilation cache so a second start skips XLA compilation.

    The directory is `path`, else $JLLM_CACHE_DIR, else ~/.cache/jllm/xla. JLLM_CACHE_DIR=off
    disables it; a cache directory the user already configured in jax is left alone.
    """
    if jax.config.jax_compilation_cache_dir:
        return jax.config.jax_compilation_cache_dir
    path = path or os.environ.get("JLLM_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "jllm", "xla")
    if path == "off":
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return path
