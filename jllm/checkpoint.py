"""Our checkpoint format: an orbax tree of the flat params, our config, metadata and the tokenizer.

    DIR/jllm.json         {"format": 1, "config": {...}, "dtype": "bfloat16", "quant": null, ...}
    DIR/params/           orbax checkpoint of {flat name: array}
    DIR/tokenizer.model   SentencePiece model, or
    DIR/tokenizer.json    a Hugging Face tokenizer (Llama-3), with its generation_config.json
                          (the ids that end generation; written from config.json's eos_token_id
                          where the source had none); neither: the model takes and returns ids
    DIR/tokenizer_config.json   the Hugging Face source's, when it had one (its chat_template)

A directory is written under a temporary name beside DIR (.DIR.tmp-XXXXXXXX, holding a marker
file with the writer's pid) and renamed into place when complete, so a failed or interrupted
save leaves nothing at DIR; the temporary directories of writers that died are removed by the
next write into the same parent.
"""
import contextlib
import json
import os
import secrets
import shutil
import socket
import sys
import time
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jllm import quant, runtime
from jllm.config import LlamaConfig

FORMAT = 1
META = "jllm.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
GENERATION_CONFIG = "generation_config.json"
# In a temporary directory while it is written: {"pid": ..., "host": ...} of the writer.
MARKER = ".jllm-writing"
# A marked temporary directory this old is stale even if its writer's pid is alive (pid reuse,
# or a writer on another host of a shared file system).
STALE_AFTER_S = 24 * 3600


def expand(path: str | os.PathLike) -> str:
    """An absolute path with `~` expanded."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def check_target(path: str, overwrite: bool, protect: tuple[str, ...] = ()) -> None:
    """Refuse to write `path` if it exists, unless overwrite and it is a jllm checkpoint that is
    not one of `protect` (the source being converted) nor contains one."""
    if not os.path.lexists(path):
        return
    real = os.path.realpath(path)
    for src in protect:
        real_src = os.path.realpath(expand(src))
        if real_src == real or real_src.startswith(real.rstrip(os.sep) + os.sep):
            raise ValueError(f"output {path!r} is or contains the source {src!r}; "
                             f"choose another directory")
    if not overwrite:
        raise FileExistsError(f"{path!r} already exists; choose a new directory or pass --overwrite")
    if not os.path.isdir(path):
        raise FileExistsError(f"{path!r} is a file; --overwrite replaces only a jllm checkpoint")
    if not os.path.isfile(os.path.join(path, META)):
        raise FileExistsError(f"{path!r} is not a jllm checkpoint (no {META}); --overwrite "
                              f"replaces only a jllm checkpoint")


def _make_parents(path: str) -> list[str]:
    """Create the missing directories above `path` -> those created, deepest first."""
    missing, d = [], os.path.dirname(path)
    while not os.path.isdir(d):
        if os.path.lexists(d):
            raise ValueError(f"cannot write to {path!r}: {d!r} is not a directory")
        missing.append(d)
        d = os.path.dirname(d)
    for i, d in enumerate(reversed(missing)):
        try:
            os.mkdir(d)
        except OSError as e:
            _remove_empty(missing[len(missing) - i:])
            raise ValueError(f"cannot write to {d!r}: {e.strerror}") from None
    return missing


def _remove_empty(dirs: list[str]) -> None:
    """Remove the directories we created (deepest first) as long as they are empty."""
    for d in dirs:
        try:
            os.rmdir(d)
        except OSError:
            return


def _make_temp(path: str) -> str:
    """Create the marked temporary directory beside `path` (mode: 0o777 less the umask)."""
    parent, name = os.path.split(path)
    try:
        while True:
            tmp = os.path.join(parent, f".{name}.tmp-{secrets.token_hex(4)}")
            with contextlib.suppress(FileExistsError):  # taken: draw another name
                os.mkdir(tmp)
                break
        _mark(tmp)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing there when mkdir itself failed
        raise ValueError(f"cannot write to {parent!r}: {e.strerror}") from None
    return tmp


def _mark(d: str) -> None:
    with open(os.path.join(d, MARKER), "w") as f:
        json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)


def _alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return True  # unknown: assume alive, keep the directory
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # e.g. another user's process
    return True


def _is_stale(d: str) -> bool:
    """Whether `d` is a temporary directory of ours whose writer is gone."""
    marker = os.path.join(d, MARKER)
    try:
        with open(marker) as f:
            info = json.load(f)
        age = time.time() - os.path.getmtime(marker)
    except (OSError, ValueError):
        return False  # no readable marker: not ours
    if not isinstance(info, dict):
        return False
    if age > STALE_AFTER_S:
        return True
    return info.get("host") == socket.gethostname() and not _alive(info.get("pid"))


def remove_stale(parent: str) -> list[str]:
    """Remove temporary directories in `parent` left by writers that died; say so on stderr."""
    try:
        entries = [e.path for e in os.scandir(parent) if e.name.startswith(".")
                   and ".tmp-" in e.name and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    removed = []
    for d in sorted(entries):
        if _is_stale(d):
            shutil.rmtree(d, ignore_errors=True)
            if not os.path.lexists(d):
                removed.append(d)
    if removed:
        print(f"removed {len(removed)} temporary director{'y' if len(removed) == 1 else 'ies'} "
              f"left by interrupted checkpoint writes: {', '.join(removed)}", file=sys.stderr)
    return removed


def _commit(tmp: str, path: str) -> None:
    """Rename the complete `tmp` to `path`; an existing checkpoint there is removed only after."""
    if os.path.lexists(path):
        aside = tmp + ".old"
        os.rename(path, aside)
        try:
            os.rename(tmp, path)
        except BaseException:
            os.rename(aside, path)
            raise
        with contextlib.suppress(OSError):
            _mark(aside)  # if removing it is interrupted, the next write finishes the job
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.rename(tmp, path)
    with contextlib.suppress(OSError):
        os.remove(os.path.join(path, MARKER))


@contextlib.contextmanager
def staging(path: str | os.PathLike, *, overwrite: bool = False,
            protect: tuple[str | os.PathLike, ...] = ()) -> Iterator[str]:
    """A temporary directory to write a checkpoint into; it replaces `path` when the block ends.

    Everything is checked before the block runs: an existing `path` is refused unless overwrite
    and it is a jllm checkpoint that is not, nor contains, one of `protect`; the location must be
    creatable and writable. On error the temporary directory and any parents created are removed.
    """
    path = expand(path)
    check_target(path, overwrite, tuple(os.fspath(p) for p in protect))
    if os.path.islink(path):  # replace the checkpoint the link points to, and keep the link
        path = os.path.realpath(path)
    created, tmp = _make_parents(path), None
    try:
        tmp = _make_temp(path)
        remove_stale(os.path.dirname(path))
        yield tmp
        _commit(tmp, path)
    except BaseException:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)
        raise


def _generation_config(folder: str) -> dict:
    """A Hugging Face directory's generation_config.json ({} without one), its eos_token_id taken
    from config.json where it has none: the ids that end generation, as HFTokenizer reads them
    (the converted checkpoint has no config.json to fall back on)."""
    generation = runtime.json_in(folder, GENERATION_CONFIG)
    ends = None if "eos_token_id" in generation else runtime.json_in(folder, "config.json").get("eos_token_id")
    return generation if ends is None else {**generation, "eos_token_id": ends}


def write(tmp: str, flat: dict[str, object], cfg: LlamaConfig, *, dtype: str,
          quant: dict | None = None, tokenizer: str | os.PathLike | None = None,
          tokenizer_config: str | os.PathLike | None = None) -> None:
    """Write flat params, metadata, the tokenizer and its Hugging Face tokenizer_config.json
    (which may carry a chat template) into the directory `tmp`."""
    ck = ocp.StandardCheckpointer()
    ck.save(os.path.join(tmp, "params"), flat)
    ck.wait_until_finished()
    meta = {"format": FORMAT, "config": json.loads(cfg.to_json()), "dtype": dtype, "quant": quant}
    with open(os.path.join(tmp, META), "w") as f:
        json.dump(meta, f, indent=2)
    if tokenizer is not None:   # tokenizer.model, or tokenizer.json and its generation_config.json
        tokenizer = os.fspath(tokenizer)
        name = "tokenizer.json" if tokenizer.endswith(".json") else "tokenizer.model"
        shutil.copyfile(tokenizer, os.path.join(tmp, name))
        generation = _generation_config(os.path.dirname(tokenizer)) if name == "tokenizer.json" else {}
        if generation:
            with open(os.path.join(tmp, GENERATION_CONFIG), "w") as f:
                json.dump(generation, f, indent=2)
    if tokenizer_config is not None:
        shutil.copyfile(tokenizer_config, os.path.join(tmp, TOKENIZER_CONFIG))


def save(path: str | os.PathLike, flat: dict[str, object], cfg: LlamaConfig, *,
         dtype: str, quant: dict | None = None, tokenizer: str | os.PathLike | None = None,
         tokenizer_config: str | os.PathLike | None = None, overwrite: bool = False) -> None:
    """Write flat params (arrays or QArrays by flat name) atomically to `path`.

    overwrite replaces only an existing jllm checkpoint, and only once the new one is complete.
    """
    with staging(path, overwrite=overwrite) as tmp:
        write(tmp, flat, cfg, dtype=dtype, quant=quant, tokenizer=tokenizer,
              tokenizer_config=tokenizer_config)


def read_meta(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """Config and metadata of a jllm checkpoint, with clear errors for what is not one."""
    path = os.path.expanduser(os.fspath(path))
    meta_path = os.path.join(path, META)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"{path!r} is a file; pass the checkpoint's directory (a jllm checkpoint "
                         f"or a Hugging Face Llama directory)")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path!r} is not a jllm checkpoint (no {META}) nor a Hugging Face Llama "
                         f"directory (no config.json)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:  # unreadable, not UTF-8, not JSON
        raise ValueError(f"cannot read checkpoint metadata {meta_path!r}: {e}") from None
    if not isinstance(meta, dict):
        raise ValueError(f"corrupt checkpoint metadata {meta_path!r}: a JSON {type(meta).__name__}, "
                         f"not an object")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path!r} has format {meta.get('format')!r}; this jllm reads {FORMAT}")
    try:
        cfg = LlamaConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint metadata {meta_path!r}: {e!r}") from None
    if meta.get("dtype") not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"corrupt checkpoint metadata {meta_path!r}: dtype={meta.get('dtype')!r}; "
                         f"expected bfloat16, float16 or float32")
    q = meta.get("quant")
    if q is not None:
        if not isinstance(q, dict):
            raise ValueError(f"corrupt checkpoint metadata {meta_path!r}: quant={q!r}; expected null or "
                             f"an object with mode and group_size")
        try:
            quant.check_mode(q.get("mode"), q.get("group_size"))
            if q.get("mode") is None:
                raise ValueError("quant has no mode")
        except ValueError as e:
            raise ValueError(f"corrupt checkpoint metadata {meta_path!r}: quant={q!r}: {e}") from None
    return cfg, meta


def _key_name(path: tuple) -> str:
    """'layers.0.wq.q' for the tree path of a flat param (or one part of a QArray)."""
    return ".".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def stored_shapes(params_dir: str) -> dict[str, tuple[int, ...]]:
    """Shapes of the arrays in an orbax params directory, read from its metadata (no data)."""
    md = ocp.StandardCheckpointer().metadata(params_dir)
    tree = getattr(md, "item_metadata", md)   # StepMetadata in newer orbax
    tree = getattr(tree, "tree", tree)        # TreeMetadata
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {_key_name(p): tuple(leaf.shape) for p, leaf in leaves
            if getattr(leaf, "shape", None) is not None}


def check_shapes(path: str, stored: dict[str, tuple[int, ...]], target) -> None:
    """Refuse a checkpoint whose stored arrays do not have the shapes its metadata implies."""
    leaves = jax.tree_util.tree_flatten_with_path(target)[0]
    want = {_key_name(p): tuple(leaf.shape) for p, leaf in leaves}
    missing = [k for k in want if k not in stored]
    if missing:
        raise ValueError(f"corrupt checkpoint {path!r}: no stored array for {missing[:5]} "
                         f"({len(missing)} of {len(want)} missing)")
    for name, shape in want.items():
        if stored[name] != shape:
            raise ValueError(f"checkpoint {path!r}: array {name!r} is stored with shape "
                             f"{stored[name]} but the config in {META} needs {shape}")


def restore(path: str | os.PathLike, target: dict[str, jax.ShapeDtypeStruct],
            progress: Callable[[str], None] | None = None) -> dict[str, jax.Array]:
    """Restore the flat params into `target` (shapes, dtypes and shardings to restore into)."""
    path = expand(path)
    params_dir = os.path.join(path, "params")
    if not os.path.isdir(params_dir):
        raise ValueError(f"corrupt checkpoint {path!r}: no params/ directory")
    try:
        stored = stored_shapes(params_dir)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise ValueError(f"corrupt checkpoint {path!r}: {e}") from None
    check_shapes(path, stored, target)
    if progress:
        progress(f"restoring {len(jax.tree.leaves(target))} arrays from {params_dir}")
    try:
        return ocp.StandardCheckpointer().restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise ValueError(f"corrupt checkpoint {path!r}: {e}") from None


def parse_dtype(name: str | None, default: str = "bfloat16"):
    name = name or default
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={name!r}; expected bfloat16, float16 or float32")
    return jnp.dtype(name)
