"""Shared fixtures: a trained tiny tokenizer, random tiny models and a scripted (bigram) model.

Everything here is built locally in seconds; nothing is downloaded. Fixtures are session-scoped
so the jitted prefill/decode compile once per shape for the whole run.
"""
import os
import sys

# Before jax is imported anywhere: no persistent compilation cache (tests must not read or write
# ~/.cache, and a cache hit would hide compile counts).
os.environ["JLLM_CACHE_DIR"] = "off"
# On CPU, compiling dominates these tiny-model tests; LLVM's optimization passes buy nothing at
# these sizes and take about a third of the suite's CPU time. GPU machines keep their defaults.
_flags = os.environ.get("XLA_FLAGS", "")
_gpu = os.path.exists("/dev/nvidiactl") or os.path.exists("/dev/kfd")
if not _gpu and "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = f"{_flags} --xla_backend_optimization_level=0".strip()
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import dataclasses  # noqa: E402
import gc  # noqa: E402

import jax  # noqa: E402

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from convert.tiny import train_tokenizer  # noqa: E402
from jllm import checkpoint  # noqa: E402
from jllm.config import LlamaConfig  # noqa: E402
from jllm.generate import Model  # noqa: E402
from jllm.model import Params, from_flat, param_infos, to_flat  # noqa: E402
from jllm.tokenizer import SentencePieceTokenizer as Tokenizer  # noqa: E402


def random_flat(cfg: LlamaConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights scaled by 1/sqrt(fan_in), norms near one, so logits are O(1) and
    greedy choices are decisive (default 0.02 init gives near-uniform logits and near-ties)."""
    rng = np.random.default_rng(seed)
    flat = {}
    for name, info in param_infos(cfg).items():
        if info.init == "ones":
            w = 1 + rng.normal(0, 0.1, info.shape)
        elif name == "tok_embeddings":
            w = rng.normal(0, 1, info.shape)
        else:
            w = rng.normal(0, info.shape[0] ** -0.5, info.shape)
        flat[name] = w.astype(np.float32)
    return flat


def random_params(cfg: LlamaConfig, seed: int = 0, dtype=jnp.float32) -> Params:
    return from_flat({k: jnp.asarray(v, dtype) for k, v in random_flat(cfg, seed).items()}, cfg)


def make_model(cfg: LlamaConfig, tokenizer: Tokenizer | None, seed: int = 0) -> Model:
    return Model(params=random_params(cfg, seed), cfg=cfg, tokenizer=tokenizer, attn_impl="xla",
                 matmul_impl="xla")


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop every compiled program after each test module. Each CPU executable holds a few memory
    mappings for its code; the suite compiles thousands of programs, and one process may hold at
    most vm.max_map_count (65,530 by default) mappings, past which the compiler crashes."""
    yield
    jax.clear_caches()
    gc.collect()


@pytest.fixture(scope="session")
def tiny_cfg() -> LlamaConfig:
    return LlamaConfig.from_name("tiny")


@pytest.fixture(scope="session")
def tokenizer_path(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
    train_tokenizer(path, 512)
    return path


@pytest.fixture(scope="session")
def tokenizer(tokenizer_path) -> Tokenizer:
    return Tokenizer(tokenizer_path)


@pytest.fixture(scope="session")
def tiny_model(tiny_cfg, tokenizer) -> Model:
    """The `tiny` config (GQA 4/2 heads, 2 layers, vocab 512), random float32 weights, a tokenizer."""
    return make_model(tiny_cfg, tokenizer)


@pytest.fixture(scope="session")
def tiny_model_no_tokenizer(tiny_model) -> Model:
    return dataclasses.replace(tiny_model, tokenizer=None)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tiny_model, tokenizer_path) -> str:
    """The tiny model saved as a jllm checkpoint (float32, with tokenizer.model)."""
    path = str(tmp_path_factory.mktemp("ckpt") / "tiny")
    flat = {k: np.asarray(v) for k, v in to_flat(tiny_model.params).items()}
    checkpoint.save(path, flat, tiny_model.cfg, dtype="float32", tokenizer=tokenizer_path)
    return path


@pytest.fixture(scope="session")
def scripted_model(tiny_cfg, tokenizer):
    """A factory: `scripted_model({current: next, ...})` is a Model whose greedy next token
    depends only on the current token and follows the given table (a bigram model).

    The attention and MLP outputs are zeroed (wo = w2 = 0), so the final hidden state is the
    normalized embedding of the current token; the output matrix then maps each token's
    (near-orthogonal, D=64) embedding to its successor with a logit margin of about 40.
    """
    base = random_flat(tiny_cfg, seed=1)
    emb = base["tok_embeddings"]                                                     # [V, D]
    unit = emb / np.sqrt(np.mean(emb * emb, axis=-1, keepdims=True))                 # rms 1

    def make(table: dict[int, int]) -> Model:
        flat = dict(base)
        flat["norm"] = np.ones_like(base["norm"])
        for i in range(tiny_cfg.n_layers):
            flat[f"layers.{i}.wo"] = np.zeros_like(base[f"layers.{i}.wo"])
            flat[f"layers.{i}.w2"] = np.zeros_like(base[f"layers.{i}.w2"])
        out = np.zeros_like(base["output"])                                          # [D, V]
        for cur, nxt in table.items():
            out[:, nxt] += unit[cur]
        flat["output"] = out
        params = from_flat({k: jnp.asarray(v) for k, v in flat.items()}, tiny_cfg)
        return Model(params=params, cfg=tiny_cfg, tokenizer=tokenizer, attn_impl="xla",
                     matmul_impl="xla")

    return make
