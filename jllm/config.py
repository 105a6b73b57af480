"""LlamaConfig: the architecture of a Llama-2 or Llama-3.x model (with its RoPE scaling), and the
named configs."""
import dataclasses
import json
import math
import numbers
import os

ROPE_SCALINGS = ("linear", "llama3", "yarn")
# The fields each kind takes besides factor (the others stay None).
_KIND_FIELDS = {"linear": (), "llama3": ("low_freq_factor", "high_freq_factor", "original_max_position"),
                "yarn": ("original_max_position", "beta_fast", "beta_slow", "attention_factor", "truncate")}
# config.json's rope_scaling fields -> ours, per kind; and those that change nothing at inference.
_HF_FIELDS = {"linear": {"factor": "factor"},
              "llama3": {"factor": "factor", "low_freq_factor": "low_freq_factor",
                         "high_freq_factor": "high_freq_factor",
                         "original_max_position_embeddings": "original_max_position"},
              "yarn": {"factor": "factor", "original_max_position_embeddings": "original_max_position",
                       "beta_fast": "beta_fast", "beta_slow": "beta_slow",
                       "attention_factor": "attention_factor", "truncate": "truncate"}}
_HF_ROPE_IGNORED = {"rope_type", "type", "rope_theta", "finetuned"}  # finetuned: older YaRN configs


def _check_positive(name: str, value, integer: bool = False) -> None:
    """ValueError naming the field unless value is an int >= 1 (integer), else a finite number > 0."""
    if (isinstance(value, bool) or not isinstance(value, int if integer else numbers.Real)
            or not math.isfinite(value) or value <= 0):
        raise ValueError(f"{name}={value!r} must be " + ("a positive int" if integer else "a finite number > 0"))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context stretched `factor` times (Peng et al. 2023, eq. 21)."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """How a long-context model stretches its RoPE frequencies (attention.rope_frequencies).

    kind "linear": every frequency divided by factor (positions / factor). kind "llama3" (Llama 3.1
    and 3.2): wavelengths over original_max_position / low_freq_factor turn factor times slower,
    those under original_max_position / high_freq_factor keep their speed, those between blend.
    kind "yarn" (YaRN, Peng et al. 2023): pairs that turn more than beta_fast times within
    original_max_position keep their speed, those turning fewer than beta_slow times turn factor
    times slower, those between blend along a linear ramp over the pair index (its ends rounded
    outwards when truncate); the attention scores are multiplied by attention_factor squared
    (Hugging Face multiplies cos and sin by it). Unset, beta_fast is 32, beta_slow 1, truncate
    True and attention_factor 0.1 ln(factor) + 1."""
    kind: str
    factor: float
    low_freq_factor: float | None = None      # llama3 only
    high_freq_factor: float | None = None     # llama3 only
    original_max_position: int | None = None  # llama3 and yarn: the context trained before scaling
    beta_fast: float | None = None            # yarn only
    beta_slow: float | None = None            # yarn only
    attention_factor: float | None = None     # yarn only
    truncate: bool | None = None              # yarn only

    def __post_init__(self):
        if self.kind not in ROPE_SCALINGS:
            raise ValueError(f"RopeScaling.kind={self.kind!r}; supported: {ROPE_SCALINGS}")
        own = _KIND_FIELDS[self.kind]
        extra = [n for fields in _KIND_FIELDS.values() for n in fields
                 if n not in own and getattr(self, n) is not None]
        if extra:
            raise ValueError(f"RopeScaling kind={self.kind!r} takes no {sorted(set(extra))}")
        if self.kind == "yarn":  # the defaults, written in so that equal scalings compare equal
            for name, default in (("beta_fast", 32.0), ("beta_slow", 1.0), ("truncate", True)):
                if getattr(self, name) is None:
                    object.__setattr__(self, name, default)
            _check_positive("RopeScaling.factor", self.factor)
            if self.attention_factor is None:
                object.__setattr__(self, "attention_factor", yarn_mscale(self.factor))
            if not isinstance(self.truncate, bool):
                raise ValueError(f"RopeScaling.truncate={self.truncate!r} must be a bool")
        for name in ("factor",) + tuple(n for n in own if n != "truncate"):
            _check_positive(f"RopeScaling.{name}", getattr(self, name), name == "original_max_position")
        if self.kind == "llama3" and not self.high_freq_factor > self.low_freq_factor:
            raise ValueError(f"RopeScaling.high_freq_factor={self.high_freq_factor!r} must be > "
                             f"low_freq_factor={self.low_freq_factor!r}")
        if self.kind == "yarn" and not self.beta_fast > self.beta_slow:
            raise ValueError(f"RopeScaling.beta_fast={self.beta_fast!r} must be > beta_slow={self.beta_slow!r}")

    @property
    def attention_scale(self) -> float:
        """What the attention scores are multiplied by (yarn's attention_factor squared, else 1)."""
        return self.attention_factor ** 2 if self.kind == "yarn" else 1.0

    @classmethod
    def from_hf(cls, params: dict, field: str, max_position: int | None = None) -> "RopeScaling | None":
        """From config.json's rope_scaling or rope_parameters object (`field`); None for "default".
        max_position (max_position_embeddings) stands in for a missing original_max_position_embeddings,
        as in transformers."""
        kind = params.get("rope_type", params.get("type", "default"))
        if kind == "default":
            return None
        if kind not in ROPE_SCALINGS:
            raise ValueError(f"config.json {field} rope_type={kind!r} is not supported; supported: "
                             f"{('default',) + ROPE_SCALINGS}")
        names = _HF_FIELDS[kind]
        hf_only = {"mscale", "mscale_all_dim"} if kind == "yarn" else set()
        unknown = sorted(set(params) - set(names) - hf_only - _HF_ROPE_IGNORED)
        if unknown:
            raise ValueError(f"config.json {field} rope_type={kind!r} has fields jllm does not handle: {unknown}")
        raw = params
        if kind == "yarn" and "truncate" in params and params["truncate"] is None:
            params = {**params, "truncate": False}  # transformers reads a null truncate as false
        params = {k: v for k, v in params.items() if v is not None}  # transformers writes unset fields as null
        if "original_max_position_embeddings" in names and max_position is not None:
            params.setdefault("original_max_position_embeddings", max_position)
        optional = {"beta_fast", "beta_slow", "attention_factor", "truncate"}
        missing = [hf for hf in names if hf not in params and hf not in optional]
        if missing:
            raise ValueError(f"config.json {field} rope_type={kind!r} is missing {missing}")
        fields = {ours: params[hf] for hf, ours in names.items() if hf in params}
        try:
            mscales = params.get("mscale"), params.get("mscale_all_dim")
            if kind == "yarn" and "attention_factor" not in fields and all(mscales):  # as transformers does
                _check_positive(f"config.json {field} factor", params["factor"])
                fields["attention_factor"] = (yarn_mscale(params["factor"], mscales[0])
                                              / yarn_mscale(params["factor"], mscales[1]))
            return cls(kind, **fields)
        except (ValueError, TypeError) as e:
            raise ValueError(f"config.json {field}={raw!r}: {e}") from None


@dataclasses.dataclass(frozen=True)
class Rope:
    """Everything RoPE needs (LlamaConfig.rope): the base theta and any scaling."""
    theta: float
    scaling: RopeScaling | None = None

    @property
    def attention_scale(self) -> float:
        """The factor on the attention scores this scaling asks for (1 unless yarn)."""
        return 1.0 if self.scaling is None else self.scaling.attention_scale


_LLAMA_31 = RopeScaling("llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=8192)
_LLAMA_32 = dataclasses.replace(_LLAMA_31, factor=32.0)

# The Llama-2 defaults; each named config lists only what differs.
CONFIGS: dict[str, dict] = {
    "llama-2-7b": dict(),
    "llama-2-13b": dict(dim=5120, n_layers=40, n_heads=40, n_kv_heads=40, ffn_dim=13824),
    "llama-2-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672),
    "codellama-34b": dict(dim=8192, n_layers=48, n_heads=64, n_kv_heads=8, ffn_dim=22016,
                          vocab_size=32000, rope_theta=1e6, max_seq_len=16384),
    "llama-3-8b": dict(n_kv_heads=8, ffn_dim=14336, vocab_size=128256, rope_theta=5e5,
                       max_seq_len=8192),
    "llama-3.1-8b": dict(n_kv_heads=8, ffn_dim=14336, vocab_size=128256, rope_theta=5e5,
                         rope_scaling=_LLAMA_31, max_seq_len=131072),
    "llama-3.1-70b": dict(dim=8192, n_layers=80, n_heads=64, n_kv_heads=8, ffn_dim=28672,
                          vocab_size=128256, rope_theta=5e5, rope_scaling=_LLAMA_31, max_seq_len=131072),
    "llama-3.2-1b": dict(dim=2048, n_layers=16, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
                         tie_embeddings=True, rope_theta=5e5, rope_scaling=_LLAMA_32, max_seq_len=131072),
    "llama-3.2-3b": dict(dim=3072, n_layers=28, n_heads=24, n_kv_heads=8, ffn_dim=8192, vocab_size=128256,
                         tie_embeddings=True, rope_theta=5e5, rope_scaling=_LLAMA_32, max_seq_len=131072),
    "tiny": dict(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=176, vocab_size=512,
                 max_seq_len=512),
}

# config.json model types of the Llama architecture.
HF_MODEL_TYPES = ("llama", "mistral")
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
    rope_scaling: RopeScaling | None = None  # a dict (from JSON) becomes a RopeScaling

    def __post_init__(self):
        for name in ("dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "vocab_size",
                     "max_seq_len"):
            _check_positive(f"LlamaConfig.{name}", getattr(self, name), integer=True)
        if self.dim % self.n_heads:
            raise ValueError(f"{self.dim=} not divisible by {self.n_heads=}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"{self.n_heads=} not divisible by {self.n_kv_heads=}")
        if self.head_dim % 2:
            raise ValueError(f"{self.head_dim=} must be even for RoPE")
        for name in ("norm_eps", "rope_theta"):
            _check_positive(f"LlamaConfig.{name}", getattr(self, name))
        if not isinstance(self.tie_embeddings, bool):
            raise ValueError(f"LlamaConfig.tie_embeddings={self.tie_embeddings!r} must be a bool")
        if isinstance(self.rope_scaling, dict):  # from to_json
            try:
                object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
            except TypeError:
                raise ValueError(f"LlamaConfig.rope_scaling={self.rope_scaling!r}; expected the fields of "
                                 f"RopeScaling: {[f.name for f in dataclasses.fields(RopeScaling)]}") from None
        if not isinstance(self.rope_scaling, (RopeScaling, type(None))):
            raise ValueError(f"LlamaConfig.rope_scaling={self.rope_scaling!r} must be a RopeScaling, a dict or None")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def rope(self) -> "Rope":
        """What RoPE reads of the config (hashable: the attention functions take it statically)."""
        return Rope(self.rope_theta, self.rope_scaling)

    @classmethod
    def from_name(cls, name: str, **overrides) -> "LlamaConfig":
        if name not in CONFIGS:
            raise KeyError(f"unknown config {name!r}; known: {', '.join(sorted(CONFIGS))}")
        return cls(**{**CONFIGS[name], **overrides})

    @classmethod
    def from_hf(cls, hf: dict) -> "LlamaConfig":
        """Build from a Hugging Face Llama or Mistral `config.json` dict; refuses what we cannot run."""
        if not isinstance(hf, dict):
            raise ValueError(f"config.json holds a JSON {type(hf).__name__}; expected an object")
        model_type = hf.get("model_type")
        if model_type not in HF_MODEL_TYPES:
            raise ValueError(f"config.json model_type={model_type!r}; supported: {HF_MODEL_TYPES} "
                             "(Mistral is the Llama architecture)")
        rope_theta, scalings = hf.get("rope_theta", 10000.0), {}
        # Older transformers write rope_scaling; newer ones rope_parameters, with rope_theta inside.
        for field in ("rope_scaling", "rope_parameters"):
            rope = hf.get(field)
            if rope is not None and not isinstance(rope, dict):
                raise ValueError(f"config.json {field}={rope!r}; expected an object")
            if rope is not None:
                rope_theta = rope.get("rope_theta", rope_theta)
                scalings[field] = RopeScaling.from_hf(rope, field, hf.get("max_position_embeddings"))
        if len(set(scalings.values())) > 1:
            raise ValueError(f"config.json rope_scaling and rope_parameters disagree: {scalings}")
        for flag in ("attention_bias", "mlp_bias"):
            if hf.get(flag):
                raise ValueError(f"config.json {flag}=true: biases are not supported")
        if hf.get("hidden_act", "silu") != "silu":
            raise ValueError(f"config.json hidden_act={hf['hidden_act']!r}; expected 'silu'")
        known = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "rms_norm_eps", "rope_theta", "rope_scaling",
                 "rope_parameters", "attention_bias", "mlp_bias", "hidden_act",
                 "tie_word_embeddings", "max_position_embeddings", "head_dim"}
        if model_type == "mistral":
            known.add("sliding_window")
        unknown = sorted(set(hf) - known - _HF_IGNORED)
        if unknown:
            raise ValueError(f"config.json has fields jllm does not handle: {unknown}")
        def number(name: str, value) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ValueError(f"config.json {name}={value!r}; expected a number")
            return float(value)

        # Mistral's sliding window (v0.1: 4096 keys): within a context that fits it, every key is
        # in every query's window, so full attention is exact; the context is capped there.
        max_seq_len, window = hf.get("max_position_embeddings", 4096), hf.get("sliding_window")
        if window is not None:
            _check_positive("config.json sliding_window", window, integer=True)
            max_seq_len = min(max_seq_len, window) if isinstance(max_seq_len, int) else max_seq_len
        try:
            n_heads, n_kv_heads = hf["num_attention_heads"], hf.get("num_key_value_heads")
            cfg = cls(dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
                      n_kv_heads=n_heads if n_kv_heads is None else n_kv_heads,
                      ffn_dim=hf["intermediate_size"], vocab_size=hf["vocab_size"],
                      norm_eps=number("rms_norm_eps", hf.get("rms_norm_eps", 1e-6)),
                      rope_theta=number("rope_theta", rope_theta),
                      tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
                      max_seq_len=max_seq_len,
                      rope_scaling=next(iter(scalings.values()), None))
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
