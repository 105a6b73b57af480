"""LlamaConfig: the architecture of a Llama-2 model, and the named configs."""
import dataclasses
import json
import math
import numbers
import os

# The Llama-2 defaults; each named config lists only what differs.
CONFIGS: dict[str, dict] = {
    "llama-2-7b": dict(),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "codellama-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim=22016,
                          vocab_size=32000, rope_theta=1e6, max_seq_len=16384),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512,
                 max_seq_len=512),
}

# HF config.json fields we read, and those that change nothing at inference.
_HF_IGNORED = {
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "_name_or_path",
    "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "use_cache",
    "attention_dropout", "pretraining_tp", "tokenizer_class", "output_attentions",
    "output_hidden_states", "return_dict", "id2label", "label2id", "max_length", "bad_words_ids",
    "begin_suppress_tokens", "chunk_size_feed_forward", "cross_attention_hidden_size",
    "decoder_start_token_id", "diversity_penalty", "do_sample", "early_stopping",
    "encoder_no_repeat_ngram_size", "exponential_decay_length_penalty", "finetuning_task",
    "forced_bos_token_id", "forced_eos_token_id", "is_decoder", "is_encoder_decoder",
    "length_penalty", "min_length", "no_repeat_ngram_size", "num_beam_groups", "num_beams",
    "num_return_sequences", "output_scores", "prefix", "problem_type", "remove_invalid_values",
    "repetition_penalty", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "top_k",
    "top_p", "torchscript", "typical_p", "use_bfloat16", "add_cross_attention",
    "quantization_config",
}


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Architecture only; runtime choices (batch, cache length, dtype, kernels) are arguments."""
    dim: int = 4096
    n_layers: int = 32
    n_heads: int = 32
    n_kv_heads: int = 32
    ffn_dim: int = 11008
    vocab_size: int = 32000
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_embeddings: bool = False
    max_seq_len: int = 4096  # the context the model was trained for

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                     "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"LlamaConfig.{name}={value!r} must be a positive int")
        if self.dim % self.n_heads:
            raise ValueError(f"{self.dim=} not divisible by {self.n_heads=}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads=} not divisible by {self.n_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"{self.head_dim=} must be even for RoPE")
        for name in ("norm_eps", "rope_theta"):
            value = getattr(self, name)
            if (not isinstance(value, numbers.Real) or isinstance(value, bool)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"LlamaConfig.{name}={value!r} must be a finite number > 0")
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_embeddings={self.tie_embeddings!r} must be a bool")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in CONFIGS:
            raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return cls(**{**CONFIGS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Build from a Hugging Face Llama `config.json` dict; refuses what we cannot run."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json holds a JSON {type(hf).__name__}; expected an object")
        if hf.get("model_type") != "llama":
            raise ValueError(f"config.json model_type={hf.get('model_type')!r}; only 'llama' is supported")
        if hf.get("rope_scaling") is not None:
            raise ValueError(f"config.json rope_scaling={hf['rope_scaling']!r} is not supported")
        rope_theta = hf.get("rope_theta", 10000.0)
        rope = hf.get("rope_parameters")  # newer transformers nest rope_theta here
        if rope is not None:
            if not isinstance(rope, dict):
                raise ValueError(f"config.json rope_parameters={rope!r}; expected an object")
            if rope.get("rope_type", "default") != "default":
                raise ValueError(f"config.json rope_parameters={rope!r}: only the default RoPE is supported")
            rope_theta = rope.get("rope_theta", rope_theta)
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json {flag}=true: biases are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; expected 'silu'")
        known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "rope_parameters", "attention_bias", "mlp_bias", "hidden_act",
                 "tie_word_embeddings", "max_position_embeddings", "head_dim"}
        unknown = sorted(set(hf) - known - _HF_IGNORED)
        if unknown:
            raise ValueError(f"config.json has fields jllm does not handle: {unknown}")
        def number(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config.json {name}={value!r}; expected a number")
            return float(value)

        try:
            n_heads, n_kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads")
            cfg = cls(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                      n_kv_heads=n_heads if n_kv_heads is None else n_kv_heads,
                      ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                      norm_eps=number("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
                      rope_theta=number("rope_theta", rope_theta),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      max_seq_len=hf.get("max_position_embeddings", 4096))
        except KeyError as e:
            raise ValueError(f"config.json is missing the field {e.args[0]!r}") from None
        if hf.get("head_dim") not in (None, cfg.head_dim):
            raise ValueError(f"config.json head_dim={hf['head_dim']} != hidden_size/num_attention_heads={cfg.head_dim}")
        return cfg

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "LlamaConfig":
        with open(path) as f:
            return cls(**json.load(f))
