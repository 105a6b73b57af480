"""Process-wide choices: the persistent compilation cache and which kernels to use by default."""
import os

import jax


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


def default_attn_impl() -> str:
    """Pallas kernels on GPU, plain XLA elsewhere (CPU, TPU)."""
    return "pallas" if jax.default_backend() == "gpu" else "xla"


def default_matmul_impl() -> str:
    return "pallas" if jax.default_backend() == "gpu" else "xla"
