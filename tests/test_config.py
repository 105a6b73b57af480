import dataclasses
import json
import math

import pytest
import transformers

from jllm.config import CONFIGS, LlamaConfig, RopeScaling


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_named_config_builds_and_divides(name):
    cfg = LlamaConfig.from_name(name)
    assert cfg.head_dim * cfg.n_heads == cfg.dim
    assert cfg.n_heads % cfg.n_kv_heads == 0


def test_llama2_sizes_match_the_paper():
    small = LlamaConfig.from_name("llama-2-7b")
    assert (small.dim, small.n_layers, small.n_heads, small.ffn_dim) == (4096, 32, 32, 11008)
    assert LlamaConfig.from_name("llama-2-13b").n_layers == 40
    big = LlamaConfig.from_name("llama-2-70b")
    assert (big.dim, big.n_heads, big.n_kv_heads, big.head_dim) == (8192, 64, 8, 128)


def test_from_name_applies_overrides():
    cfg = LlamaConfig.from_name("tiny", n_layers=3, rope_theta=1e6)
    assert (cfg.n_layers, cfg.rope_theta, cfg.dim) == (3, 1e6, CONFIGS["tiny"]["dim"])


def test_unknown_config_name_is_key_error_listing_names():
    with pytest.raises(KeyError, match="llama-4-8b") as e:
        LlamaConfig.from_name("llama-4-8b")
    for name in CONFIGS:
        assert name in str(e.value)


def test_config_is_frozen_and_hashable():
    a, b = LlamaConfig.from_name("tiny"), LlamaConfig.from_name("tiny")
    assert a == b and hash(a) == hash(b)
    assert a != LlamaConfig.from_name("tiny", n_layers=3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.dim = 128


@pytest.mark.parametrize("kw, match", [
    (dict(dim=65, n_heads=4, n_kv_heads=4), "dim=65"),
    (dict(dim=64, n_heads=4, n_kv_heads=3), "n_kv_heads=3"),
    (dict(dim=12, n_heads=4, n_kv_heads=4), "head_dim=3"),
    (dict(n_layers=0), "n_layers=0"),
    (dict(vocab_size=-1), "vocab_size=-1"),
    (dict(n_layers=True), "n_layers=True"),
    (dict(dim=64.0, n_heads=4, n_kv_heads=4), "dim=64.0"),
    (dict(norm_eps=0.0), "norm_eps=0.0"),
    (dict(rope_theta=-1.0), "rope_theta=-1.0"),
    (dict(norm_eps="1e-5"), "norm_eps='1e-5'"),
    (dict(rope_theta=None), "rope_theta=None"),
    (dict(rope_theta=float("inf")), "rope_theta=inf"),
    (dict(norm_eps=True), "norm_eps=True"),
    (dict(tie_embeddings="false"), "tie_embeddings='false'"),
    (dict(rope_scaling={"kind": "dynamic", "factor": 2.0}), "kind='dynamic'; supported: \\('linear', 'llama3', 'yarn'\\)"),
    (dict(rope_scaling={"kind": "yarn", "factor": 2.0}), "original_max_position=None must be a positive int"),
    (dict(rope_scaling={"kind": "yarn", "factor": 2.0, "original_max_position": 4096, "beta_fast": 1.0}),
     "beta_fast=1.0 must be > beta_slow=1.0"),
    (dict(rope_scaling={"kind": "yarn", "factor": 2.0, "original_max_position": 4096, "truncate": "yes"}),
     "truncate='yes' must be a bool"),
    (dict(rope_scaling={"kind": "yarn", "factor": 2.0, "original_max_position": 4096, "attention_factor": -1.0}),
     "attention_factor=-1.0 must be a finite number > 0"),
    (dict(rope_scaling={"kind": "yarn", "factor": 2.0, "original_max_position": 4096, "low_freq_factor": 1.0}),
     "kind='yarn' takes no \\['low_freq_factor'\\]"),
    (dict(rope_scaling={"kind": "llama3", "factor": 2.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                        "original_max_position": 64, "beta_fast": 32.0}), "kind='llama3' takes no \\['beta_fast'\\]"),
    (dict(rope_scaling={"kind": "linear", "scale": 2.0}), "rope_scaling=.*'scale'"),
    (dict(rope_scaling={"kind": "linear", "factor": 0}), "factor=0 must be a finite number > 0"),
    (dict(rope_scaling={"kind": "linear", "factor": 2.0, "low_freq_factor": 1.0}), "low_freq_factor"),
    (dict(rope_scaling={"kind": "llama3", "factor": 8.0}), "low_freq_factor=None"),
    (dict(rope_scaling=dict(kind="llama3", factor=8.0, low_freq_factor=4.0, high_freq_factor=1.0,
                            original_max_position=8192)), "high_freq_factor=1.0 must be > low_freq_factor=4.0"),
    (dict(rope_scaling=dict(kind="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position=8192.0)), "original_max_position=8192.0 must be a positive int"),
    (dict(rope_scaling=dict(kind="llama3", factor=float("nan"), low_freq_factor=1.0, high_freq_factor=4.0,
                            original_max_position=8192)), "factor=nan"),
    (dict(rope_scaling=8.0), "rope_scaling=8.0 must be a RopeScaling"),
], ids=lambda v: v if isinstance(v, str) else "-".join(f"{k}={x}" for k, x in v.items()))
def test_invalid_config_raises_value_error_with_the_values(kw, match):
    with pytest.raises(ValueError, match=match):
        LlamaConfig(**kw)


@pytest.mark.parametrize("name", ["tiny", "llama-3.1-8b", "llama-3.2-1b"])
def test_json_round_trip(tmp_path, name):
    cfg = LlamaConfig.from_name(name, tie_embeddings=True, rope_theta=1e6)
    path = tmp_path / "cfg.json"
    path.write_text(cfg.to_json())
    back = LlamaConfig.from_json_file(path)
    assert back == cfg and hash(back) == hash(cfg)
    assert back.rope_scaling is None or isinstance(back.rope_scaling, RopeScaling)


def test_json_without_rope_scaling_loads_unscaled(tmp_path):
    """Checkpoints written before the field existed."""
    old = json.loads(LlamaConfig.from_name("tiny").to_json())
    del old["rope_scaling"]
    (tmp_path / "cfg.json").write_text(json.dumps(old))
    assert LlamaConfig.from_json_file(tmp_path / "cfg.json") == LlamaConfig.from_name("tiny")


LLAMA3 = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 8192, "rope_type": "llama3"}
LLAMA3_SCALING = RopeScaling("llama3", 8.0, 1.0, 4.0, 8192)


def _hf_dict(**kw) -> dict:
    base = dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=512, max_position_embeddings=256, rms_norm_eps=1e-6)
    return transformers.LlamaConfig(**{**base, **kw}).to_dict()


@pytest.mark.parametrize("rope_theta", [10000.0, 1e6])
@pytest.mark.parametrize("tie", [False, True])
def test_from_hf_reads_transformers_own_config(rope_theta, tie):
    hf = _hf_dict(rope_theta=rope_theta, tie_word_embeddings=tie)
    assert "rope_parameters" in hf  # new transformers nest rope_theta here
    cfg = LlamaConfig.from_hf(hf)
    assert cfg == LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176,
                              vocab_size=512, norm_eps=1e-6, rope_theta=rope_theta,
                              tie_embeddings=tie, max_seq_len=256)


def test_from_hf_reads_flat_rope_theta_and_missing_kv_heads():
    hf = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 176, "num_hidden_layers": 2,
          "num_attention_heads": 4, "vocab_size": 512, "rope_theta": 5e5, "rms_norm_eps": 1e-5,
          "max_position_embeddings": 128}
    cfg = LlamaConfig.from_hf(hf)
    assert (cfg.n_kv_heads, cfg.rope_theta, cfg.max_seq_len) == (4, 5e5, 128)


def _flat_hf(**kw) -> dict:
    """A config.json as older transformers wrote them (Llama 3.1's on the Hub): flat rope_theta."""
    hf = _hf_dict()
    del hf["rope_parameters"]
    return {**hf, "rope_theta": 5e5, **kw}


@pytest.mark.parametrize("hf, want", [
    (_flat_hf(rope_scaling=LLAMA3), LLAMA3_SCALING),
    (_flat_hf(rope_scaling={**LLAMA3, "type": "llama3"}), LLAMA3_SCALING),
    (_flat_hf(rope_scaling={"type": "linear", "factor": 2}), RopeScaling("linear", 2.0)),
    (_flat_hf(rope_scaling={"rope_type": "linear", "factor": 2.0}), RopeScaling("linear", 2.0)),
    (_flat_hf(rope_scaling={"rope_type": "default"}), None),
    (_flat_hf(rope_scaling=None), None),
    (_hf_dict(rope_parameters={**LLAMA3, "rope_theta": 5e5}), LLAMA3_SCALING),
    (_hf_dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 5e5}), RopeScaling("linear", 2.0)),
    ({**_hf_dict(rope_parameters={**LLAMA3, "rope_theta": 5e5}), "rope_scaling": LLAMA3}, LLAMA3_SCALING),
], ids=["flat_llama3", "type_and_rope_type", "linear_type", "linear_rope_type", "default", "null",
        "rope_parameters_llama3", "rope_parameters_linear", "both_agreeing"])
def test_from_hf_reads_rope_scaling(hf, want):
    cfg = LlamaConfig.from_hf(hf)
    assert (cfg.rope_theta, cfg.rope_scaling) == (5e5, want)


def test_from_hf_reads_transformers_own_scaled_config():
    cfg = LlamaConfig.from_hf(_hf_dict(rope_parameters={**LLAMA3, "rope_theta": 5e5}, max_position_embeddings=131072))
    assert cfg == LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512,
                              norm_eps=1e-6, rope_theta=5e5, max_seq_len=131072, rope_scaling=LLAMA3_SCALING)


def test_from_hf_reads_yarn_old_and_new():
    """A YaRN-Llama-2 style rope_scaling (type, finetuned) and transformers' rope_parameters with
    nulls; a missing original_max_position_embeddings is max_position_embeddings, as in transformers."""
    old = {k: v for k, v in _hf_dict().items() if k != "rope_parameters"}  # as an older transformers wrote it
    old = LlamaConfig.from_hf({**old, "rope_theta": 1e4, "max_position_embeddings": 65536, "rope_scaling": {
        "factor": 16.0, "original_max_position_embeddings": 4096, "type": "yarn", "finetuned": True}})
    assert old.rope_scaling == RopeScaling("yarn", 16.0, original_max_position=4096)
    assert old.rope_scaling.attention_factor == pytest.approx(0.1 * math.log(16) + 1)
    new = LlamaConfig.from_hf(_hf_dict(max_position_embeddings=4096, rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "beta_fast": None, "attention_factor": None,
        "mscale": 2.0, "mscale_all_dim": 1.0}))
    assert new.rope_scaling == RopeScaling("yarn", 4.0, original_max_position=4096, beta_fast=32.0, beta_slow=1.0,
                                           attention_factor=(0.2 * math.log(4) + 1) / (0.1 * math.log(4) + 1))
    # A null truncate is false in transformers (its ramp ends are not rounded), not the default true.
    untruncated = LlamaConfig.from_hf(_hf_dict(rope_parameters={
        "rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0, "original_max_position_embeddings": 2048,
        "truncate": None}))
    assert untruncated.rope_scaling.truncate is False
    back = LlamaConfig(**json.loads(new.to_json()))
    assert back == new and back.rope.attention_scale == pytest.approx(new.rope_scaling.attention_factor ** 2)


@pytest.mark.parametrize("change, match", [
    (dict(model_type="qwen2"), r"model_type='qwen2'; supported: \('llama', 'mistral'\)"),
    (dict(model_type="mistral", sliding_window=0), "sliding_window=0 must be a positive int"),
    # _hf_dict's rope_parameters say "default"
    (dict(rope_scaling={"type": "linear", "factor": 2.0}), "rope_scaling and rope_parameters disagree"),
    (dict(rope_parameters={"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}),
     r"rope_parameters rope_type='llama3' is missing \['low_freq_factor', 'high_freq_factor'\]"),
    (dict(rope_parameters={"rope_type": "longrope", "rope_theta": 5e5, "factor": 4.0}),
     r"rope_parameters rope_type='longrope' is not supported; supported: \('default', 'linear', 'llama3', 'yarn'\)"),
    (dict(rope_parameters={"rope_type": "yarn", "rope_theta": 5e5}), r"rope_type='yarn' is missing \['factor'\]"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "beta_fast": 1, "beta_slow": 32, "mscale": None}),
     r"rope_parameters=\{'rope_type': 'yarn', 'factor': 4.0, 'beta_fast': 1, 'beta_slow': 32, 'mscale': None\}: "
     r".*beta_fast=1 must be > beta_slow=32"),  # the fields as written
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "mscale": 1.0, "mscale_all_dim": 0.0, "extra": 1}),
     r"rope_type='yarn' has fields jllm does not handle: \['extra'\]"),
    (dict(rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_type='dynamic' is not supported"),
    (dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "partial_rotary_factor": 0.5}),
     r"rope_parameters rope_type='linear' has fields jllm does not handle: \['partial_rotary_factor'\]"),
    (dict(rope_parameters={"rope_type": "linear", "factor": -2.0}),
     r"rope_parameters=.*factor=-2.0 must be a finite number > 0"),
    (dict(rope_parameters={**LLAMA3, "low_freq_factor": 4.0}), "high_freq_factor=4.0 must be > low_freq_factor=4.0"),
    (dict(attention_bias=True), "attention_bias"),
    (dict(mlp_bias=True), "mlp_bias"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(sliding_window=4096), "sliding_window"),
    (dict(head_dim=32), "head_dim=32"),
    (dict(num_key_value_heads=0), "n_kv_heads=0"),  # not taken for an absent field (all heads)
], ids=lambda v: v if isinstance(v, str) else "-".join(v))
def test_from_hf_refuses_what_it_cannot_run(change, match):
    hf = {**_hf_dict(), **change}
    with pytest.raises(ValueError, match=match):
        LlamaConfig.from_hf(hf)


def test_from_hf_names_a_missing_field():
    hf = _hf_dict()
    del hf["intermediate_size"]
    with pytest.raises(ValueError, match="intermediate_size"):
        LlamaConfig.from_hf(hf)
