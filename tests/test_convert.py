"""Hugging Face parity and converter refusals.

Random `transformers.LlamaForCausalLM` models (and a `MistralForCausalLM`, the same architecture;
float32, eager attention) are saved the ways HF checkpoints come (single safetensors, sharded
safetensors with an index, pytorch_model.bin), converted through scripts/convert_hf.py and loaded
with `jllm.load`. HF is ground truth.
"""
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import ROOT
from safetensors.numpy import load_file, save_file

import jllm
from jllm import hf as hf_convert
from convert.tiny import make_tiny_hf
from jllm import checkpoint
from jllm.model import forward as _forward
from jllm.model import init_cache

forward = jax.jit(_forward, static_argnames=("cfg",))
SCRIPT = os.path.join(ROOT, "scripts", "convert_hf.py")
# float32 end to end; observed errors are ~1e-6 on logits of magnitude ~3.
REL_TOL, ABS_TOL = 1e-4, 1e-4
# bfloat16 weights and activations (8 bits of mantissa) through two layers.
BF16_REL_TOL = 5e-2
PROMPT_LEN, N_PROMPTS, GREEDY_TOKENS = 20, 3, 64

HF_CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=4, num_key_value_heads=2),
    "gqa_tied": dict(num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True),
    "gqa_theta1e6": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6),
    # Mistral-7B v0.2/v0.3: GQA, theta 1e6, no sliding window
    "mistral": dict(num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, sliding_window=None),
}


def hf_model(name: str, seed: int = 0, **config) -> transformers.LlamaForCausalLM:
    kw = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, vocab_size=512,
              max_position_embeddings=256, rms_norm_eps=1e-6, initializer_range=0.1,
              tie_word_embeddings=False, attn_implementation="eager")
    torch.manual_seed(seed)
    kw = {**kw, **HF_CONFIGS[name], **config}
    if name == "mistral":
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**kw))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kw))
    with torch.no_grad():  # norms away from one, so a skipped or swapped norm shows
        for key, p in model.named_parameters():
            if "norm" in key:
                p.add_(0.1 * torch.randn_like(p))
    return model.float().eval()


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, SCRIPT, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "JLLM_CACHE_DIR": "off"}, timeout=300)


def convert_script(hf_dir, out_dir, dtype: str = "float32") -> str:
    r = run_script(str(hf_dir), str(out_dir), "--dtype", dtype)
    assert r.returncode == 0, r.stderr[-3000:]
    return str(out_dir)


def prompts(vocab: int) -> np.ndarray:
    return np.random.default_rng(0).integers(3, vocab, (N_PROMPTS, PROMPT_LEN)).astype(np.int32)


def jllm_logits(model, tokens: np.ndarray) -> np.ndarray:
    cache = init_cache(model.cfg, tokens.shape[0], tokens.shape[1], model.dtype)
    out, _ = forward(model.params, jnp.asarray(tokens), cache, cfg=model.cfg)
    return np.asarray(out)


def hf_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def hf_greedy(model, prompt: np.ndarray, n: int) -> list[int]:
    seq = torch.tensor(prompt[None], dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            nxt = model(seq).logits[0, -1].argmax()
            seq = torch.cat([seq, nxt.view(1, 1)], dim=1)
    return seq[0, len(prompt):].tolist()


def assert_close(got: np.ndarray, want: np.ndarray, rel: float, abs_: float | None = None) -> None:
    err = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert err <= rel, f"relative error {err:.2e} > {rel:.0e}"
    if abs_ is not None:
        worst = np.abs(got - want).max()
        assert worst <= abs_, f"max abs error {worst:.2e} > {abs_:.0e}"


# --- parity ------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=list(HF_CONFIGS))
def case(request, tmp_path_factory, tokenizer_path):
    """One HF model saved as model.safetensors (+ tokenizer.model), converted by the script."""
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = hf_model(name)
    hf_dir = root / "hf"
    model.save_pretrained(hf_dir)
    shutil.copyfile(tokenizer_path, hf_dir / "tokenizer.model")
    out = convert_script(hf_dir, root / "jllm")
    tokens = prompts(model.config.vocab_size)
    return dict(name=name, hf=model, hf_dir=hf_dir, out=out, root=root, tokens=tokens,
                ref=hf_logits(model, tokens))


def test_converted_checkpoint_matches_hf_logits(case):
    model = jllm.load(case["out"], "float32", progress=False)
    assert model.dtype == jnp.float32 and model.tokenizer is not None
    hf_cfg = case["hf"].config
    assert (model.cfg.n_kv_heads, model.cfg.tie_embeddings, model.cfg.rope_theta) == (
        hf_cfg.num_key_value_heads, hf_cfg.tie_word_embeddings, hf_cfg.rope_parameters["rope_theta"])
    assert_close(jllm_logits(model, case["tokens"]), case["ref"], REL_TOL, ABS_TOL)


def test_converted_checkpoint_greedy_matches_hf(case):
    model = jllm.load(case["out"], "float32", progress=False)
    prompt = case["tokens"][0]
    [r] = jllm.generate(model, [prompt.tolist()], max_new_tokens=GREEDY_TOKENS, stop_token_ids=[])
    assert r.tokens == hf_greedy(case["hf"], prompt, GREEDY_TOKENS)
    assert r.finish_reason == "length"


def test_mistral_sliding_window_caps_the_context(tmp_path, tokenizer_path):
    """Mistral-7B v0.1's sliding window: within a context that fits the window every key is in
    every query's window, so jllm caps the context there and matches HF; past it, it refuses."""
    hf = hf_model("mistral", sliding_window=24)
    hf.save_pretrained(tmp_path / "hf")
    shutil.copyfile(tokenizer_path, tmp_path / "hf" / "tokenizer.model")
    model = jllm.load(convert_script(tmp_path / "hf", tmp_path / "jllm"), "float32", progress=False)
    assert (model.cfg.max_seq_len, hf.config.max_position_embeddings) == (24, 256)
    tokens = prompts(hf.config.vocab_size)
    assert_close(jllm_logits(model, tokens), hf_logits(hf, tokens), REL_TOL, ABS_TOL)
    [r] = jllm.generate(model, [tokens[0].tolist()], max_new_tokens=4, stop_token_ids=[])
    assert r.tokens == hf_greedy(hf, tokens[0], 4)
    with pytest.raises(ValueError, match="max_seq_len"):
        jllm.generate(model, [tokens[0].tolist()], max_new_tokens=5, stop_token_ids=[])


def test_in_memory_load_of_hf_directory_matches_converted(case):
    converted = jllm.load(case["out"], "float32", progress=False)
    direct = jllm.load(case["hf_dir"], "float32", progress=False)
    assert direct.cfg == converted.cfg and direct.tokenizer is not None
    np.testing.assert_array_equal(jllm_logits(direct, case["tokens"]),
                                  jllm_logits(converted, case["tokens"]))


@pytest.mark.parametrize("name", ["gqa"])
def test_sharded_safetensors_with_index_converts_the_same(name, tmp_path, tokenizer_path):
    model = hf_model(name)
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir, max_shard_size="100KB")
    assert (hf_dir / "model.safetensors.index.json").is_file()
    assert len(list(hf_dir.glob("model-*.safetensors"))) > 1
    shutil.copyfile(tokenizer_path, hf_dir / "tokenizer.model")
    loaded = jllm.load(convert_script(hf_dir, tmp_path / "jllm"), "float32", progress=False)
    tokens = prompts(512)
    assert_close(jllm_logits(loaded, tokens), hf_logits(model, tokens), REL_TOL, ABS_TOL)


@pytest.mark.parametrize("name", ["gqa_tied", "gqa"])
def test_pytorch_bin_converts_the_same(name, tmp_path):
    """pytorch_model.bin (the pre-safetensors format); a tied model's state dict repeats lm_head."""
    model = hf_model(name)
    hf_dir = tmp_path / "hf"
    model.config.save_pretrained(hf_dir)
    torch.save(model.state_dict(), hf_dir / "pytorch_model.bin")
    assert ("lm_head.weight" in model.state_dict()) and not (hf_dir / "model.safetensors").exists()
    loaded = jllm.load(convert_script(hf_dir, tmp_path / "jllm"), "float32", progress=False)
    assert loaded.tokenizer is None
    tokens = prompts(512)
    assert_close(jllm_logits(loaded, tokens), hf_logits(model, tokens), REL_TOL, ABS_TOL)


def test_bfloat16_conversion_is_close(tmp_path):
    model = hf_model("gqa")
    hf_dir = tmp_path / "hf"
    model.save_pretrained(hf_dir)
    out = convert_script(hf_dir, tmp_path / "jllm", dtype="bfloat16")
    with open(os.path.join(out, checkpoint.META)) as f:
        assert json.load(f)["dtype"] == "bfloat16"
    loaded = jllm.load(out, progress=False)   # the checkpoint's dtype by default
    assert loaded.dtype == jnp.bfloat16
    tokens = prompts(512)
    got = jllm_logits(loaded, tokens)
    assert_close(got, hf_logits(model, tokens), BF16_REL_TOL)
    # Most next-token choices survive the rounding.
    assert np.mean(got.argmax(-1) == hf_logits(model, tokens).argmax(-1)) > 0.8


def test_jllm_checkpoint_round_trip_keeps_weights(tiny_checkpoint, tiny_model):
    loaded = jllm.load(tiny_checkpoint, progress=False)
    assert loaded.cfg == tiny_model.cfg and loaded.dtype == jnp.float32
    for a, b in zip(jax.tree.leaves(loaded.params), jax.tree.leaves(tiny_model.params)):
        np.testing.assert_array_equal(a, b)
    assert loaded.tokenizer is not None and loaded.tokenizer.vocab_size == 512


# --- refusals -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_hf(tmp_path_factory) -> str:
    """A tiny HF directory (config.json + model.safetensors, no tokenizer)."""
    return make_tiny_hf(str(tmp_path_factory.mktemp("tiny_hf") / "hf"), tokenizer=False)


def _edit_config(d, **change):
    path = os.path.join(d, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    cfg.update(change)
    with open(path, "w") as f:
        json.dump(cfg, f)


def _edit_tensors(d, fn):
    path = os.path.join(d, "model.safetensors")
    tensors = {k: np.array(v) for k, v in load_file(path).items()}
    fn(tensors)
    save_file(tensors, path)


def _shard(d, duplicate: bool = False, drop_file: bool = False):
    """Split model.safetensors in two shards with an index (optionally broken)."""
    tensors = load_file(os.path.join(d, "model.safetensors"))
    os.remove(os.path.join(d, "model.safetensors"))
    keys = sorted(tensors)
    halves = {"model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    if duplicate:
        halves["model-00002-of-00002.safetensors"].append(keys[0])
    for fname, ks in halves.items():
        save_file({k: tensors[k] for k in ks}, os.path.join(d, fname))
    weight_map = {k: f for f, ks in halves.items() for k in ks}
    if drop_file:
        weight_map["lm_head.weight"] = "model-00003-of-00003.safetensors"
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _corrupt(d, truncate: bool):
    path = os.path.join(d, "model.safetensors")
    if truncate:
        with open(path, "r+b") as f:
            f.truncate(os.path.getsize(path) // 2)
    else:
        with open(path, "wb") as f:
            f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00this is not json at all")


BREAKAGES = {
    "model_type": (lambda d: _edit_config(d, model_type="qwen2"), ValueError, "model_type='qwen2'"),
    "rope_scaling": (lambda d: _edit_config(d, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
                     ValueError, "rope_scaling"),
    "attention_bias": (lambda d: _edit_config(d, attention_bias=True), ValueError, "attention_bias"),
    "unknown_field": (lambda d: _edit_config(d, sliding_window=128), ValueError, "sliding_window"),
    "missing_tensor": (lambda d: _edit_tensors(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                       ValueError, r"model\.layers\.1\.mlp\.up_proj\.weight"),
    "extra_tensor": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"model.layers.0.self_attn.q_proj.bias": np.zeros(64, np.float32)})),
                     ValueError, r"model\.layers\.0\.self_attn\.q_proj\.bias"),
    "shape_mismatch": (lambda d: _edit_tensors(d, lambda t: t.update(
        {"model.layers.0.self_attn.k_proj.weight": np.zeros((64, 64), np.float32)})),
                       ValueError, r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(64, 64\)"),
    "garbage_weights": (lambda d: _corrupt(d, truncate=False), ValueError, "model.safetensors"),
    "truncated_weights": (lambda d: _corrupt(d, truncate=True), ValueError, "model.safetensors"),
    "no_weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")), ValueError, "no weights"),
    "missing_config": (lambda d: os.remove(os.path.join(d, "config.json")), ValueError, "config.json"),
    "garbage_config": (lambda d: open(os.path.join(d, "config.json"), "w").write("{"), ValueError,
                       "config.json"),
    "duplicate_tensor": (lambda d: _shard(d, duplicate=True), ValueError, "appears twice"),
    "index_names_missing_shard": (lambda d: _shard(d, drop_file=True), ValueError,
                                  "model-00003-of-00003"),
}


@pytest.mark.parametrize("breakage", list(BREAKAGES))
def test_converter_refuses_and_leaves_nothing(tiny_hf, tmp_path, breakage):
    damage, error, match = BREAKAGES[breakage]
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    damage(str(src))
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(error, match=match):
        hf_convert.convert(src, parent / "ckpt", dtype="float32", progress=False)
    assert os.listdir(parent) == []


def test_converter_refuses_a_missing_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        hf_convert.convert(tmp_path / "nowhere", tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_failed_save_leaves_no_temporary_directory(tiny_hf, tmp_path, monkeypatch, tokenizer_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    shutil.copyfile(tokenizer_path, src / "tokenizer.model")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(checkpoint.shutil, "copyfile", fail)  # fails after the params are written
    parent = tmp_path / "out"
    parent.mkdir()
    with pytest.raises(OSError, match="disk full"):
        hf_convert.convert(src, parent / "ckpt", dtype="float32", progress=False)
    assert os.listdir(parent) == []


def test_script_refusal_exits_nonzero_and_writes_nothing(tiny_hf, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    _edit_config(str(src), model_type="qwen2")
    r = run_script(str(src), str(tmp_path / "ckpt"), "--dtype", "float32")
    assert r.returncode != 0 and "model_type" in r.stderr
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_existing_output_is_refused_unless_overwrite(tiny_hf, tmp_path):
    out = tmp_path / "ckpt"
    out.mkdir()
    (out / "keep").write_text("x")
    with pytest.raises(FileExistsError, match="ckpt"):
        hf_convert.convert(tiny_hf, out, dtype="float32", progress=False)
    # --overwrite replaces only a jllm checkpoint, never a directory of other files.
    with pytest.raises(FileExistsError, match="not a jllm checkpoint"):
        hf_convert.convert(tiny_hf, out, dtype="float32", overwrite=True, progress=False)
    assert (out / "keep").exists()
    (out / "keep").unlink()
    out.rmdir()
    with pytest.warns(UserWarning, match="tokenizer.model"):
        hf_convert.convert(tiny_hf, out, dtype="float32", progress=False)
    (out / "keep").write_text("x")  # inside a checkpoint: replaced with it
    with pytest.warns(UserWarning, match="tokenizer.model"):
        hf_convert.convert(tiny_hf, out, dtype="bfloat16", overwrite=True, progress=False)
    assert not (out / "keep").exists() and checkpoint.read_meta(out)[1]["dtype"] == "bfloat16"


def test_rotary_inv_freq_buffer_is_ignored(tiny_hf, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    _edit_tensors(str(src), lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    with pytest.warns(UserWarning):
        cfg, flat, tok = hf_convert.load_hf(src, "float32", progress=False)
    assert tok is None and "layers.0.wq" in flat


def test_no_tokenizer_converts_with_warning_and_generates_ids(tiny_hf, tmp_path):
    with pytest.warns(UserWarning, match="no tokenizer.model"):
        hf_convert.convert(tiny_hf, tmp_path / "ckpt", dtype="float32", progress=False)
    assert not (tmp_path / "ckpt" / "tokenizer.model").exists()
    model = jllm.load(tmp_path / "ckpt", progress=False)
    assert model.tokenizer is None
    [r] = jllm.generate(model, [[1, 17, 42, 99]], max_new_tokens=24)
    assert r.text is None and len(r.tokens) == 24 and r.finish_reason == "length"


def test_tokenizer_larger_than_vocab_is_refused(tmp_path, tokenizer_path):
    cfg = jllm.LlamaConfig.from_name("tiny", vocab_size=300)
    hf_dir = make_tiny_hf(str(tmp_path / "hf"), cfg, tokenizer=False)
    shutil.copyfile(tokenizer_path, os.path.join(hf_dir, "tokenizer.model"))
    with pytest.raises(ValueError, match="vocab_size is 300"):
        jllm.load(hf_dir, "float32", progress=False)


def test_tokenizer_config_is_copied_with_its_chat_template(tiny_hf, tmp_path, tokenizer_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    shutil.copyfile(tokenizer_path, src / "tokenizer.model")
    config = {"chat_template": "{{ bos_token }}{{ messages[0]['content'] }}", "bos_token": "<s>"}
    (src / "tokenizer_config.json").write_text(json.dumps(config))
    hf_convert.convert(src, tmp_path / "ckpt", dtype="float32", progress=False)
    assert json.loads((tmp_path / "ckpt" / "tokenizer_config.json").read_text()) == config


def test_tokenizer_config_that_is_not_json_is_refused_before_writing(tiny_hf, tmp_path):
    src = tmp_path / "hf"
    shutil.copytree(tiny_hf, src)
    (src / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        hf_convert.convert(src, tmp_path / "ckpt", dtype="float32", progress=False)
    assert not (tmp_path / "ckpt").exists()
