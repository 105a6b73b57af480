"""Llama-3.1/3.2 ("llama3"), YaRN and linear RoPE scaling: the frequencies against transformers', a
tiny scaled Hugging Face model end to end (logits, greedy tokens, the Pallas and int8 decode paths),
and the named Llama-3.x configs.

The tiny HF models have head_dim 32, theta 5e5 and original_max_position 32: their frequency pairs
fall in all three bands of each scaling (kept, blended, slowed by factor), and the prompts run past
position 32.
"""
import dataclasses
import warnings

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import jllm
from conftest import make_model
from jllm.attention import rope_frequencies
from jllm.config import LlamaConfig, Rope, RopeScaling
from jllm.kvcache import init_cache
from jllm.model import forward, init_params

LLAMA3 = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=32)
# beta_fast 8 and beta_slow 2 put the ramp inside head_dim 32's 16 pairs; attention factor 1.277.
YARN = dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=32, beta_fast=8, beta_slow=2)
SCALINGS = {"llama3": (LLAMA3, RopeScaling("llama3", 8.0, 1.0, 4.0, 32)),
            "yarn": (YARN, RopeScaling("yarn", 16.0, original_max_position=32, beta_fast=8, beta_slow=2))}
PROMPT_LEN, NEW_TOKENS = 48, 16


def _hf_rope(head_dim: int, rope_parameters: dict, with_attention_factor: bool = False):
    """transformers' inv_freq [K / 2] for these rope_parameters (and its attention factor)."""
    max_position = rope_parameters.get("original_max_position_embeddings", 8192) * rope_parameters["factor"]
    cfg = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4,
                                   max_position_embeddings=int(max_position),
                                   rope_parameters={"rope_theta": 5e5, **rope_parameters})
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")
    return (inv_freq.numpy(), attention_factor) if with_attention_factor else inv_freq.numpy()


def _bands(inv_freq: np.ndarray, s: RopeScaling) -> tuple[int, int, int]:
    """How many frequency pairs llama3 keeps, blends and slows."""
    wavelen = 2 * np.pi / inv_freq
    kept = wavelen < s.original_max_position / s.high_freq_factor
    slowed = wavelen > s.original_max_position / s.low_freq_factor
    return int(kept.sum()), int((~kept & ~slowed).sum()), int(slowed.sum())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("factor", [8.0, 32.0], ids=["llama-3.1", "llama-3.2"])
def test_llama3_frequencies_match_transformers(head_dim, factor):
    scaling = RopeScaling("llama3", factor, 1.0, 4.0, 8192)
    got = np.asarray(rope_frequencies(head_dim, Rope(5e5, scaling)))
    want = _hf_rope(head_dim, dict(LLAMA3, factor=factor, original_max_position_embeddings=8192))
    assert min(_bands(np.asarray(rope_frequencies(head_dim, 5e5)), scaling)) > 0  # all three bands
    np.testing.assert_allclose(got, want, rtol=3e-7, atol=0)  # float32 rounding (XLA's pow vs torch's)


@pytest.mark.parametrize("head_dim", [64, 128])
def test_linear_frequencies_match_transformers(head_dim):
    got = np.asarray(rope_frequencies(head_dim, Rope(5e5, RopeScaling("linear", 4.0))))
    np.testing.assert_allclose(got, _hf_rope(head_dim, dict(rope_type="linear", factor=4.0)), rtol=3e-7, atol=0)


def _yarn_bands(inv_freq: np.ndarray, s: RopeScaling) -> tuple[int, int, int]:
    """How many frequency pairs yarn keeps, blends and slows (against the unscaled inv_freq)."""
    base = np.asarray(rope_frequencies(2 * len(inv_freq), 5e5))
    ratio = inv_freq / base
    kept, slowed = np.isclose(ratio, 1, rtol=1e-6), np.isclose(ratio, 1 / s.factor, rtol=1e-6)
    return int(kept.sum()), int((~kept & ~slowed).sum()), int(slowed.sum())


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("params", [
    dict(factor=4.0, original_max_position_embeddings=4096),
    dict(factor=16.0, original_max_position_embeddings=8192, beta_fast=16, beta_slow=2, truncate=False),
    dict(factor=8.0, original_max_position_embeddings=2048, mscale=0.707, mscale_all_dim=0.707),
    dict(factor=8.0, original_max_position_embeddings=2048, mscale=1.0, mscale_all_dim=0.5),
    dict(factor=2.0, original_max_position_embeddings=4096, attention_factor=1.5),
    dict(factor=4.0, original_max_position_embeddings=2048, truncate=None),  # null: not truncated
], ids=["defaults", "betas_untruncated", "mscale_equal", "mscale_ratio", "attention_factor", "truncate_null"])
def test_yarn_frequencies_and_attention_factor_match_transformers(head_dim, params):
    s = RopeScaling.from_hf({"rope_type": "yarn", **params}, "rope_scaling")
    got = np.asarray(rope_frequencies(head_dim, Rope(5e5, s)))
    want, attention_factor = _hf_rope(head_dim, dict(rope_type="yarn", **params), with_attention_factor=True)
    assert min(_yarn_bands(got, s)) > 0  # all three bands
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=0)  # float32: XLA's pow, then the blend's 4 roundings
    assert s.attention_factor == pytest.approx(attention_factor, rel=1e-12)
    assert Rope(5e5, s).attention_scale == pytest.approx(attention_factor ** 2, rel=1e-12)


# --- a tiny scaled HF model end to end -------------------------------------------------------------

@pytest.fixture(scope="module", params=sorted(SCALINGS))
def scaled(tmp_path_factory, request):
    """A random float32 LlamaForCausalLM with llama3 or yarn scaling, saved and loaded by jllm.load."""
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        hidden_size=128, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=512, max_position_embeddings=512, rms_norm_eps=1e-6, initializer_range=0.1,
        rope_parameters={"rope_theta": 5e5, **SCALINGS[request.param][0]}, attn_implementation="eager")
    hf = transformers.LlamaForCausalLM(hf_cfg).float().eval()
    path = tmp_path_factory.mktemp(request.param) / "hf"
    hf.save_pretrained(path)
    tokens = np.random.default_rng(0).integers(3, 512, (2, PROMPT_LEN)).astype(np.int32)
    with torch.no_grad():
        logits = hf(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
        out = hf.generate(torch.tensor(tokens[:1], dtype=torch.long), max_new_tokens=NEW_TOKENS,
                          min_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=0)
    with warnings.catch_warnings():  # no tokenizer: the model takes token ids, as here
        warnings.simplefilter("ignore", UserWarning)
        model = jllm.load(path, "float32", progress=False)
    return dict(model=model, tokens=tokens, logits=logits, greedy=out[0, PROMPT_LEN:].tolist(),
                scaling=SCALINGS[request.param][1])


def _logits(model, tokens, cfg=None):
    cfg = cfg or model.cfg
    out, _ = jax.jit(forward, static_argnames="cfg")(model.params, tokens, init_cache(cfg, *tokens.shape, np.float32),
                                                     cfg=cfg)
    return np.asarray(out)


def _greedy(model, prompt) -> list[int]:
    [r] = jllm.generate(model, [prompt.tolist()], max_new_tokens=NEW_TOKENS, stop_token_ids=[])
    return r.tokens


def test_scaled_checkpoint_loads_its_scaling(scaled):
    cfg = scaled["model"].cfg
    assert cfg.rope == Rope(5e5, scaled["scaling"])
    if cfg.rope_scaling.kind == "llama3":
        assert min(_bands(np.asarray(rope_frequencies(cfg.head_dim, cfg.rope_theta)), cfg.rope_scaling)) > 0
    else:
        assert min(_yarn_bands(np.asarray(rope_frequencies(cfg.head_dim, cfg.rope)), cfg.rope_scaling)) > 0
        assert cfg.rope.attention_scale == pytest.approx((0.1 * np.log(16) + 1) ** 2)


def test_scaled_logits_match_transformers_past_the_original_context(scaled):
    model, tokens = scaled["model"], scaled["tokens"]
    np.testing.assert_allclose(_logits(model, tokens), scaled["logits"], atol=1e-4, rtol=0)
    # Unscaled, the same weights miss (so the comparison above sees the scaling).
    unscaled = dataclasses.replace(model.cfg, rope_scaling=None)
    assert np.abs(_logits(model, tokens, unscaled) - scaled["logits"]).max() > 1e-2
    if model.cfg.rope_scaling.kind == "yarn":  # and so do yarn's frequencies without its attention factor
        plain = dataclasses.replace(model.cfg.rope_scaling, attention_factor=1.0)
        assert np.abs(_logits(model, tokens, dataclasses.replace(model.cfg, rope_scaling=plain))
                      - scaled["logits"]).max() > 1e-2


def test_scaled_greedy_matches_transformers_generate(scaled):
    assert _greedy(scaled["model"], scaled["tokens"][0]) == scaled["greedy"]


def test_scaled_pallas_decode_gives_the_same_tokens(scaled):
    """The Pallas decode kernel rotates q and the new key itself, by rope_frequencies' scaled inv_freq."""
    model = dataclasses.replace(scaled["model"], attn_impl="pallas")
    assert _greedy(model, scaled["tokens"][0]) == scaled["greedy"]


def test_scaled_engine_gives_the_same_tokens(scaled):
    """The paged cache of the serving engine rotates at the scaled frequencies too."""
    from jllm.engine import Engine, SamplingParams
    engine = Engine(scaled["model"], max_seqs=2, page_size=16, num_pages=8, max_tokens_per_step=64,
                    decode_buckets=(2,), progress=False)
    engine.add_request(scaled["tokens"][0].tolist(), SamplingParams(max_tokens=NEW_TOKENS, stop_token_ids=[]))
    tokens = []
    while engine.has_unfinished():
        tokens += [t for out in engine.step() for t in out.token_ids]
    assert tokens == scaled["greedy"]


@pytest.mark.parametrize("scaling", [RopeScaling("llama3", 8.0, 1.0, 4.0, 64),
                                     RopeScaling("yarn", 16.0, original_max_position=64, beta_fast=8, beta_slow=1,
                                                 truncate=False)],
                         ids=["llama3", "yarn"])
def test_scaled_int8_cache_pallas_decode_matches_xla(tiny_cfg, scaling):
    """One query head per KV head: the int8 cache's fused decode (attention.decode_append_int8)
    rotates at the scaled frequencies too (head_dim 16, original 64: all three bands)."""
    cfg = dataclasses.replace(tiny_cfg, n_kv_heads=tiny_cfg.n_heads, rope_theta=5e5, rope_scaling=scaling)
    bands = _bands if scaling.kind == "llama3" else _yarn_bands
    base = rope_frequencies(cfg.head_dim, cfg.rope_theta if scaling.kind == "llama3" else cfg.rope)
    assert min(bands(np.asarray(base), cfg.rope_scaling)) > 0
    model = dataclasses.replace(make_model(cfg, None), kv_cache_dtype="int8")
    prompt = np.arange(3, 3 + 70)  # past original_max_position = 64
    assert _greedy(dataclasses.replace(model, attn_impl="pallas"), prompt) == _greedy(model, prompt)


# --- named configs ---------------------------------------------------------------------------------

def test_llama3_named_configs():
    cfg = LlamaConfig.from_name("llama-3.1-8b")
    assert (cfg.n_kv_heads, cfg.ffn_dim, cfg.vocab_size, cfg.rope_theta, cfg.max_seq_len) == (
        8, 14336, 128256, 5e5, 131072)
    assert cfg.rope_scaling == RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)
    assert LlamaConfig.from_name("llama-3-8b").rope_scaling is None
    assert LlamaConfig.from_name("llama-3.1-70b").rope_scaling == cfg.rope_scaling
    for name in ("llama-3.2-1b", "llama-3.2-3b"):
        small = LlamaConfig.from_name(name)
        assert small.tie_embeddings and small.rope_scaling.factor == 32.0
    assert LlamaConfig.from_name("llama-3.2-3b").head_dim == 128


def test_llama32_1b_params_are_tied_and_1_24b():
    cfg = LlamaConfig.from_name("llama-3.2-1b")
    shapes = jax.eval_shape(lambda key: init_params(cfg, key), jax.random.key(0))
    assert shapes.output is None and shapes.tok_embeddings.shape == (128256, 2048)
    assert shapes.layers[0].wk.shape == (2048, 8 * 64)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == 1_235_814_400  # Meta's 1.24B
