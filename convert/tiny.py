"""Build a small random-weight Llama in Hugging Face format, with a SentencePiece tokenizer trained
on local text: the built-in default for the quickstart and a fixture for tests (no downloads).

The weights are random: the model produces fluent-looking nonsense, useful only to exercise the
pipeline (conversion, loading, generation, streaming) end to end.
"""
import inspect
import json
import os
import shutil
import tempfile

import numpy as np
import sentencepiece as spm

from jllm.hf import hf_key
from jllm.config import LlamaConfig
from jllm.model import param_infos


def local_corpus() -> list[str]:
    """Lines of English text from the docstrings of the standard library (present everywhere)."""
    import argparse, collections, dataclasses, functools, itertools, json as json_mod, pathlib  # noqa: E401
    import re, string, textwrap, unittest  # noqa: E401
    lines = []
    for mod in (argparse, collections, dataclasses, functools, itertools, json_mod, pathlib, re,
                string, textwrap, unittest, os, inspect, shutil, tempfile):
        for _, obj in inspect.getmembers(mod):
            doc = inspect.getdoc(obj) if callable(obj) or inspect.ismodule(obj) else None
            if doc:
                lines.extend(line.strip() for line in doc.splitlines() if len(line.strip()) > 20)
    lines += ["Grüße aus Köln, naïve café, déjà vu.", "日本語のテキスト、中文文本。", "Emoji: 🙂🚀✨"]
    return lines


def train_tokenizer(out_path: str, vocab_size: int) -> None:
    """Train a Llama-style SentencePiece BPE model (byte fallback, <unk>=0 <s>=1 </s>=2)."""
    prefix = os.path.join(tempfile.mkdtemp(), "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(local_corpus()), model_prefix=prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, split_digits=True, add_dummy_prefix=True, minloglevel=2,
        num_threads=1)
    shutil.move(prefix + ".model", out_path)
    shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)


def hf_config(cfg: LlamaConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
            "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32"}


def make_tiny_hf(out_dir: str, cfg: LlamaConfig | None = None, seed: int = 0,
                 tokenizer: bool = True) -> str:
    """Write config.json, model.safetensors (float32, HF names and layout) and tokenizer.model."""
    from safetensors.numpy import save_file

    cfg = cfg or LlamaConfig.from_name("tiny")
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    tensors = {}
    for name, info in param_infos(cfg).items():
        # Norm weights near (not at) one, so a swapped or skipped norm shows in the logits.
        w = (1 + rng.normal(0, 0.1, info.shape) if info.init == "ones"
             else rng.normal(0, 0.02, info.shape)).astype(np.float32)
        key, transpose = hf_key(name)  # HF names come from the converter's own table
        tensors[key] = np.ascontiguousarray(w.T if transpose else w)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(hf_config(cfg), f, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    if tokenizer:
        train_tokenizer(os.path.join(out_dir, "tokenizer.model"), min(cfg.vocab_size, 512))
    return out_dir
