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
from jllm.config import LlamaConfig, RopeScaling
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


def train_tokenizer(out_path: str, vocab_size: int, control_symbols: tuple[str, ...] = ()) -> None:
    """Train a Llama-style SentencePiece BPE model (byte fallback, <unk>=0 <s>=1 </s>=2), with
    control_symbols after those (as Mistral's v3 tokenizer holds [INST] and [/INST])."""
    prefix = os.path.join(tempfile.mkdtemp(), "sp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(local_corpus()), model_prefix=prefix, vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=0.9995, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, split_digits=True, add_dummy_prefix=True, minloglevel=2,
        num_threads=1, control_symbols=list(control_symbols))
    shutil.move(prefix + ".model", out_path)
    shutil.rmtree(os.path.dirname(prefix), ignore_errors=True)


# Llama-3's pre-tokenizer split (contractions, words, 1-3 digits, punctuation runs, whitespace).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"
                 r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                  "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
                  "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>",
                  "<|python_tag|>"]
# Llama-3's chat template, in its short (tool-less) form.
LLAMA3_CHAT_TEMPLATE = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
    " + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}")


def train_bpe_tokenizer(out_dir: str, vocab_size: int) -> None:
    """Write a Llama-3-style tokenizer (tokenizer.json: byte-level BPE with Llama-3's split and its
    special tokens after the merges; tokenizer_config.json with the chat template;
    generation_config.json ending on <|end_of_text|>, <|eom_id|> and <|eot_id|>) into out_dir."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size - len(LLAMA3_SPECIAL), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(local_corpus(), trainer)
    tok.add_special_tokens(LLAMA3_SPECIAL)
    bos = LLAMA3_SPECIAL[0]
    tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                       special_tokens=[(bos, tok.token_to_id(bos))])
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIAL}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": bos, "eos_token": "<|eot_id|>",
              "clean_up_tokenization_spaces": True, "model_max_length": 131072,
              "chat_template": LLAMA3_CHAT_TEMPLATE,
              "added_tokens_decoder": {str(i): {"content": t, "special": True, "lstrip": False, "rstrip": False,
                                                "normalized": False, "single_word": False}
                                       for t, i in ids.items()}}
    generation = {"bos_token_id": ids[bos], "do_sample": True, "temperature": 0.6, "top_p": 0.9,
                  "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
    for name, obj in (("tokenizer_config.json", config), ("generation_config.json", generation)):
        with open(os.path.join(out_dir, name), "w") as f:
            json.dump(obj, f, indent=2)


def hf_config(cfg: LlamaConfig) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": cfg.dim,
            "intermediate_size": cfg.ffn_dim, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
            "vocab_size": cfg.vocab_size, "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
            "tie_word_embeddings": cfg.tie_embeddings, "max_position_embeddings": cfg.max_seq_len,
            "hidden_act": "silu", "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "float32",
            **({} if cfg.rope_scaling is None else {"rope_scaling": _hf_rope_scaling(cfg.rope_scaling)})}


def _hf_rope_scaling(s: RopeScaling) -> dict:
    """config.json's rope_scaling object of a RopeScaling."""
    out = {"rope_type": s.kind, "factor": s.factor}
    if s.kind == "llama3":
        out.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                   original_max_position_embeddings=s.original_max_position)
    return out


def make_tiny_hf(out_dir: str, cfg: LlamaConfig | None = None, seed: int = 0,
                 tokenizer: bool | str = True) -> str:
    """Write config.json, model.safetensors (float32, HF names and layout) and tokenizer.model
    (tokenizer="bpe": Llama-3's kind of tokenizer, `train_bpe_tokenizer`; False: none)."""
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
    config = hf_config(cfg)
    if tokenizer == "bpe":
        train_bpe_tokenizer(out_dir, min(cfg.vocab_size, 512))
        with open(os.path.join(out_dir, "generation_config.json")) as f:
            generation = json.load(f)
        config.update(bos_token_id=generation["bos_token_id"], eos_token_id=generation["eos_token_id"])
    elif tokenizer:
        train_tokenizer(os.path.join(out_dir, "tokenizer.model"), min(cfg.vocab_size, 512))
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    save_file(tensors, os.path.join(out_dir, "model.safetensors"))
    return out_dir
