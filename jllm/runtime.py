"""Process-wide setup (the persistent compilation cache, the Pallas-Triton warning filter) and the
status lines and progress bars of long work."""
import contextlib
import json
import os
import sys
import time
import warnings
from collections.abc import Callable

import jax
import tqdm


def quiet_triton_deprecation() -> None:
    """jax 0.11 deprecates Pallas-Triton and warns at every Triton lowering, i.e. at each compile of
    a step that holds one of our kernels. The kernels are Triton by choice (pallas_kernels/README.md),
    so the package ignores exactly those warnings, once, when it is imported."""
    warnings.filterwarnings("ignore", category=DeprecationWarning, message=r".*[Tt]riton.*")


_CACHE_OPTIONS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
                  "jax_persistent_cache_min_entry_size_bytes")


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
    for name, value in zip(_CACHE_OPTIONS, (path, 0.0, 0)):  # every compiled program is cached
        jax.config.update(name, value)
    return path


@contextlib.contextmanager
def compilation_cache(path: str):
    """The persistent compilation cache in `path` for the duration of the block; the process's
    setting before it comes back afterwards (a benchmark's temporary cache directory is deleted
    when it ends, and later compiles must not keep writing there)."""
    from jax.experimental.compilation_cache import compilation_cache as cc
    before = {name: getattr(jax.config, name) for name in _CACHE_OPTIONS}
    jax.config.update("jax_compilation_cache_dir", None)
    cc.reset_cache()
    try:
        enable_compilation_cache(path)
        yield path
    finally:
        for name, value in before.items():
            jax.config.update(name, value)
        cc.reset_cache()


MEM_FRACTION_VARS = ("XLA_CLIENT_MEM_FRACTION", "XLA_PYTHON_CLIENT_MEM_FRACTION")


def set_device_memory_fraction(fraction: float) -> bool:
    """Let JAX's GPU allocator take `fraction` of each GPU (JAX's own default is 0.75), for a process
    that sizes its KV pages from what is left after the weights (the engine). Only before the first
    device use, and the environment wins (XLA_CLIENT_MEM_FRACTION, or the older
    XLA_PYTHON_CLIENT_MEM_FRACTION, which this sets and jax 0.10 and 0.11 read). Returns whether it
    took effect."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"device memory fraction {fraction!r}; expected a number in (0, 1]")
    if any(os.environ.get(v) for v in MEM_FRACTION_VARS) or _backends_initialized():
        return False
    os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{fraction:g}"
    return True


def _backends_initialized() -> bool:
    try:
        from jax._src import xla_bridge
        return xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):  # no such helper: assume the worst, change nothing
        return True


def read_json_object(path: str) -> dict:
    """The JSON object in the file `path`; ValueError naming the file for anything else."""
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read {path!r}: {e}") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{path!r} holds a JSON {type(obj).__name__}; expected an object")
    return obj


def json_in(folder: str, name: str) -> dict:
    """The JSON object in folder/name, {} when there is no such file; ValueError naming a bad one."""
    path = os.path.join(folder, name)
    return read_json_object(path) if os.path.isfile(path) else {}


def write_atomic(path: str, write: Callable[[str], None]) -> None:
    """write(tmp) to a temporary file beside `path`, then rename it to `path`: an interrupted or
    failed write leaves no half-written file (and no temporary one)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def say(msg: str) -> None:
    """A progress or status line on stderr, from process 0 only (in a multi-process run every
    process runs the same program; one of them reports)."""
    if jax.process_index() == 0:
        print(msg, file=sys.stderr, flush=True)


def progress(iterable, total: int | None = None, desc: str = "", enabled: bool = True):
    """Iterate with a tqdm bar on a terminal; when stderr is not one (a log file, CI), just a line
    at the start and one at the end instead of a bar; nothing when disabled."""
    if not enabled or jax.process_index() != 0:
        yield from iterable
        return
    if sys.stderr.isatty():
        yield from tqdm.tqdm(iterable, total=total, desc=desc, file=sys.stderr, dynamic_ncols=True)
        return
    t = time.perf_counter()
    print(f"{desc}: {total if total is not None else '?'} steps", file=sys.stderr, flush=True)
    n = 0
    for n, item in enumerate(iterable, 1):
        yield item
    print(f"{desc}: {n} done in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
