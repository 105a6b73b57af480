"""Hugging Face Llama (and Mistral) directories: the reader (`load_hf`, which `jllm.load` uses for
an HF directory) and `convert`, which writes what it reads as a jllm checkpoint.

Reads `config.json` and `model.safetensors`, sharded `*.safetensors` with
`model.safetensors.index.json`, or `pytorch_model*.bin` (needs torch). Every tensor is mapped
through one key table, its shape checked against the model's declaration, and nothing unknown,
missing or duplicated passes silently.
"""
import json
import os
import re
import warnings
from collections.abc import Callable

import ml_dtypes
import numpy as np

from jllm import checkpoint, quant, runtime
from jllm.config import LlamaConfig
from jllm.model import param_infos
from jllm.tokenizer import Tokenizer, find_tokenizer, open_tokenizer

# Our name -> (HF name, transpose). HF stores linear weights as [out, in]; ours are [in, out] so
# every matmul is `x @ w`. Layer weights sit under "model.layers.{i}.".
LAYER_KEYS: dict[str, tuple[str, bool]] = {
    "attention_norm": ("input_layernorm.weight", False),
    "wq": ("self_attn.q_proj.weight", True),
    "wk": ("self_attn.k_proj.weight", True),
    "wv": ("self_attn.v_proj.weight", True),
    "wo": ("self_attn.o_proj.weight", True),
    "ffn_norm": ("post_attention_layernorm.weight", False),
    "w1": ("mlp.gate_proj.weight", True),
    "w3": ("mlp.up_proj.weight", True),
    "w2": ("mlp.down_proj.weight", True),
}
TOP_KEYS: dict[str, tuple[str, bool]] = {
    "tok_embeddings": ("model.embed_tokens.weight", False),
    "norm": ("model.norm.weight", False),
    "output": ("lm_head.weight", True),
}
# Buffers some checkpoints carry that hold nothing we need.
IGNORED = [r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]


def hf_key(name: str) -> tuple[str, bool]:
    """Our flat name -> (the HF tensor name, whether HF stores it transposed)."""
    if name.startswith("layers."):
        _, i, short = name.split(".")
        key, transpose = LAYER_KEYS[short]
        return f"model.layers.{i}.{key}", transpose
    return TOP_KEYS[name]


_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


def key_map(cfg: LlamaConfig) -> dict[str, tuple[str, bool]]:
    """HF name -> (our name, transpose) for every weight of this config."""
    return {hf_key(name)[0]: (name, hf_key(name)[1]) for name in param_infos(cfg)}


def convert_weight(key: str, value: np.ndarray, cfg: LlamaConfig, dtype,
                   keys: dict[str, tuple[str, bool]]) -> tuple[str, np.ndarray] | None:
    """One HF tensor -> (our name, array in `dtype` and our layout), checking its shape and that
    every value is finite (in the source and after the cast to `dtype`); None for a tensor we skip.

    keys: key_map(cfg). A key neither there nor skipped is refused."""
    if key not in keys:
        # Tied embeddings: lm_head repeats embed_tokens.
        if (key == TOP_KEYS["output"][0] and cfg.tie_embeddings) or any(re.fullmatch(p, key) for p in IGNORED):
            return None
        raise ValueError(f"unexpected tensor {key!r} in the checkpoint: not a weight of {cfg}")
    name, transpose = keys[key]
    infos = param_infos(cfg)
    # HF's q/k projections already use the rotate-half RoPE layout jllm uses (jllm/model.py), so
    # they need no permutation; Meta's original checkpoints (interleaved pairs) would.
    w = value.T if transpose else value
    if tuple(w.shape) != infos[name].shape:
        raise ValueError(f"tensor {key!r} has shape {tuple(value.shape)}; expected "
                         f"{infos[name].shape[::-1] if transpose else infos[name].shape} for {cfg}")
    with np.errstate(over="ignore"):  # an overflow to inf is reported below, naming the tensor
        w = np.ascontiguousarray(w.astype(dtype))
    finite = np.isfinite(w)
    if not finite.all():
        first = np.unravel_index(np.argmin(finite), w.shape)  # in our layout
        where = tuple(int(i) for i in (first[::-1] if transpose else first))  # in the HF tensor
        there = value[where]
        why = "" if not np.isfinite(there) else f", beyond the range of {np.dtype(dtype).name}"
        raise ValueError(f"tensor {key!r} has {w.size - np.count_nonzero(finite)} non-finite "
                         f"values (NaN or inf) as {np.dtype(dtype).name}, e.g. {there} at "
                         f"{list(where)}{why}")
    return name, w


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    """Memory-map a .safetensors file (header: 8-byte length, JSON; then raw little-endian data)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            n = int.from_bytes(f.read(8), "little")
            if n > size - 8:
                raise ValueError(f"its header length field says {n} bytes but the file has {size}")
            header = json.loads(f.read(n))
        if not isinstance(header, dict):
            raise ValueError(f"its header is a JSON {type(header).__name__}; expected an object")
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
        out = {}
        for key, info in header.items():
            if key == "__metadata__":
                continue
            if info["dtype"] not in _ST_DTYPES:
                raise ValueError(f"tensor {key!r} has dtype {info['dtype']}; expected one of {sorted(_ST_DTYPES)}")
            start, end = info["data_offsets"]
            out[key] = data[start:end].view(_ST_DTYPES[info["dtype"]]).reshape(info["shape"])
        return out
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read safetensors file {path!r}: {e}") from None


def _read_torch_bin(path: str) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise ValueError(f"{path!r} is a PyTorch checkpoint; install torch to convert it") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a bad file
        raise ValueError(f"cannot read PyTorch checkpoint {path!r}: {e}") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path!r} holds a {type(state).__name__}; expected a state dict of tensors")
    out = {}
    for key, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{path!r}: {key!r} is a {type(t).__name__}, not a tensor; expected a flat "
                             f"state dict of the model's tensors")
        if t.dtype == torch.bfloat16:
            out[key] = t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        else:
            out[key] = t.float().numpy() if t.dtype not in (torch.float16, torch.float32) else t.numpy()
    return out


def weight_files(hf_dir: str) -> list[str]:
    """The checkpoint's weight files, in the order the index or the directory gives them."""
    hf_dir = os.path.expanduser(hf_dir)
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index_path = os.path.join(hf_dir, index)
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (OSError, KeyError, TypeError, AttributeError, json.JSONDecodeError) as e:
                raise ValueError(f"cannot read {index_path!r}: {e!r}") from None
            missing = [p for p in files if not os.path.isfile(os.path.join(hf_dir, p))]
            if missing:
                raise ValueError(f"{index_path!r} lists weight files that are missing: {missing}")
            return [os.path.join(hf_dir, p) for p in files]
        if os.path.isfile(os.path.join(hf_dir, single)):
            return [os.path.join(hf_dir, single)]
    raise ValueError(f"no weights in {hf_dir!r}: expected model.safetensors, sharded *.safetensors "
                     f"with model.safetensors.index.json, or pytorch_model*.bin")


def read_config(hf_dir: str | os.PathLike) -> LlamaConfig:
    """The LlamaConfig of an HF directory's config.json."""
    hf_dir = os.path.expanduser(os.fspath(hf_dir))
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"Hugging Face directory {hf_dir!r} does not exist")
    return LlamaConfig.from_hf(runtime.read_json_object(os.path.join(hf_dir, "config.json")))


def load_tokenizer(path: str, cfg: LlamaConfig) -> Tokenizer:
    """The tokenizer.model or tokenizer.json at `path`, refused if it cannot be read or if it has
    more pieces than the model has embeddings."""
    tokenizer = open_tokenizer(path)  # ValueError naming the file if it cannot be read
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"{path!r} has {tokenizer.vocab_size} pieces but the model's vocab_size "
                         f"is {cfg.vocab_size}")
    return tokenizer


def load_hf(hf_dir: str | os.PathLike, dtype="bfloat16", progress: bool = True,
            place: Callable[[str, np.ndarray], object] | None = None,
            ) -> tuple[LlamaConfig, dict[str, object], str | None]:
    """Read an HF Llama directory -> (config, flat params, tokenizer file path or None).

    Params are numpy arrays, or whatever `place(name, array)` makes of each tensor as soon as it
    is converted (e.g. a device array in its shards), so host memory holds one tensor at a time.
    """
    hf_dir = os.path.expanduser(os.fspath(hf_dir))
    cfg = read_config(hf_dir)
    dtype = checkpoint.parse_dtype(dtype)
    tok = find_tokenizer(hf_dir)
    if tok is not None:
        load_tokenizer(tok, cfg)  # before the weights: a bad tokenizer fails in seconds
    infos, keys = param_infos(cfg), key_map(cfg)
    flat: dict[str, np.ndarray] = {}
    files = weight_files(hf_dir)

    def tensors():
        for path in files:
            read = _read_safetensors if path.endswith(".safetensors") else _read_torch_bin
            for key, value in read(path).items():
                yield path, key, value

    for path, key, value in runtime.progress(tensors(), len(infos), "converting tensors", progress):
        converted = convert_weight(key, value, cfg, dtype, keys)
        if converted is None:
            continue
        name, w = converted
        if name in flat:
            raise ValueError(f"tensor {key!r} appears twice (again in {os.path.basename(path)})")
        flat[name] = place(name, w) if place is not None else w
        del w
    missing = [k for k in infos if k not in flat]
    if missing:
        raise ValueError(f"the checkpoint lacks {len(missing)} tensors jllm needs, e.g. "
                         f"{[hf_key(k)[0] for k in missing[:5]]}")
    if tok is None:
        warnings.warn(f"{hf_dir!r} has no tokenizer.model or tokenizer.json: the model will take and return token ids")
    return cfg, {k: flat[k] for k in infos}, tok


def read_tokenizer_config(model_dir: str) -> tuple[str, dict] | None:
    """(path, contents) of DIR/tokenizer_config.json (it may hold a chat template), None if absent;
    ValueError naming the file when it is not a readable JSON object (before any weight is read)."""
    path = os.path.join(model_dir, checkpoint.TOKENIZER_CONFIG)
    return (path, runtime.read_json_object(path)) if os.path.isfile(path) else None


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "bfloat16",
            overwrite: bool = False, progress: bool = True, quantize: str | None = None,
            group_size: int | None = None) -> LlamaConfig:
    """Convert an HF Llama directory into a jllm checkpoint at out_dir (written atomically).

    quantize="int8" | "int4" stores the linear weights quantized (the mode goes in the metadata).
    overwrite replaces an existing jllm checkpoint (never the source, nor anything else). The
    source's config and the output location are checked before any weight is read.
    """
    hf_dir = os.path.expanduser(os.fspath(hf_dir))
    quant.check_mode(quantize, group_size)
    dtype_name = checkpoint.parse_dtype(dtype).name
    read_config(hf_dir)
    tok_config = read_tokenizer_config(hf_dir)
    tok_config = tok_config and tok_config[0]
    with checkpoint.staging(out_dir, overwrite=overwrite, protect=(hf_dir,)) as tmp:
        cfg, flat, tok = load_hf(hf_dir, dtype, progress=progress)
        meta = None
        if quantize is not None:
            flat, err = quant.quantize_flat(flat, quantize, group_size, progress=progress)
            meta = {"mode": quantize, "group_size": group_size, "max_abs_error": err}
            if progress:
                runtime.say(f"quantized linear weights to {quantize}; largest absolute error {err:.3g}")
        if progress:
            runtime.say(f"writing {checkpoint.expand(out_dir)}")
        checkpoint.write(tmp, flat, cfg, dtype=dtype_name, tokenizer=tok, quant=meta,
                         tokenizer_config=tok_config)
    return cfg
