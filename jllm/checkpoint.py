"""Our checkpoint format: an orbax tree of the flat params, our config, metadata and the tokenizer.

    DIR/jllm.json         {"format": 1, "config": {...}, "dtype": "bfloat16", "quant": null, ...}
    DIR/params/           orbax checkpoint of {flat name: array}
    DIR/tokenizer.model   SentencePiece model (absent: the model takes and returns token ids)

A directory is written under a temporary name beside DIR and renamed into place when complete,
so a failed or interrupted save leaves nothing at DIR.
"""
import json
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jllm.config import LlamaConfig

FORMAT = 1
META = "jllm.json"


def save(path: str | os.PathLike, flat: dict[str, object], cfg: LlamaConfig, *,
         dtype: str, quant: dict | None = None, tokenizer: str | os.PathLike | None = None,
         overwrite: bool = False) -> None:
    """Write flat params (arrays or QArrays by flat name) atomically to `path`."""
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and (not overwrite or not os.path.isdir(path)):
        raise FileExistsError(f"{path} already exists; choose a new directory or pass overwrite=True")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        ck = ocp.StandardCheckpointer()
        ck.save(os.path.join(tmp, "params"), flat)
        ck.wait_until_finished()
        meta = {"format": FORMAT, "config": json.loads(cfg.to_json()), "dtype": dtype, "quant": quant}
        with open(os.path.join(tmp, META), "w") as f:
            json.dump(meta, f, indent=2)
        if tokenizer is not None:
            shutil.copyfile(tokenizer, os.path.join(tmp, "tokenizer.model"))
        if os.path.exists(path):
            shutil.rmtree(path)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_meta(path: str | os.PathLike) -> tuple[LlamaConfig, dict]:
    """Config and metadata of a jllm checkpoint, with clear errors for what is not one."""
    path = os.fspath(path)
    meta_path = os.path.join(path, META)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"checkpoint directory {path!r} does not exist")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{path!r} is not a jllm checkpoint (no {META}) nor a Hugging Face Llama "
                         f"directory (no config.json)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        cfg = LlamaConfig(**meta["config"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt checkpoint metadata {meta_path!r}: {e!r}") from None
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path!r} has format {meta.get('format')!r}; this jllm reads {FORMAT}")
    return cfg, meta


def restore(path: str | os.PathLike, target: dict[str, jax.ShapeDtypeStruct],
            progress: Callable[[str], None] | None = None) -> dict[str, jax.Array]:
    """Restore the flat params into `target` (shapes, dtypes and shardings to restore into)."""
    params_dir = os.path.join(os.path.abspath(os.fspath(path)), "params")
    if not os.path.isdir(params_dir):
        raise ValueError(f"corrupt checkpoint {os.fspath(path)!r}: no params/ directory")
    if progress:
        progress(f"restoring {len(jax.tree.leaves(target))} arrays from {params_dir}")
    try:
        return ocp.StandardCheckpointer().restore(params_dir, target)
    except (ValueError, KeyError, FileNotFoundError, OSError) as e:
        raise ValueError(f"corrupt checkpoint {os.fspath(path)!r}: {e}") from None


def dtype_name(dtype) -> str:
    return jnp.dtype(dtype).name


def parse_dtype(name: str | None, default: str = "bfloat16"):
    name = name or default
    if name not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype={name!r}; expected bfloat16, float16 or float32")
    return jnp.dtype(name)
