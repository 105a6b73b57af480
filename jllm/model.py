"""Llama-2 as pure functions over a params pytree.

Dimension key: B batch, T new tokens, S cache length, D dim, H query heads, G kv heads,
R = H // G query heads per kv head, K head dim, F ffn dim, V vocab, L layers.

Layers are a Python list (as in gemma v1), not a stack run by `lax.scan`: each layer's weights and
KV cache are then separate buffers that the decode step reads and updates in place, where a scanned
stack slices them per layer and XLA may copy the slice. Compile time grows with depth (about linearly);
the persistent compilation cache makes the second start fast.

RoPE uses the Hugging Face "rotate half" layout (the two halves of each head are the real and
imaginary parts), so HF checkpoints load without permuting wq/wk; Meta's original checkpoints use
interleaved pairs and would need the permutation instead.
"""
import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp

from jllm import quant
from jllm.config import LlamaConfig
from pallas_kernels.kv_quant import dequantize_kv, quantize_kv  # the int8 cache's rounding

AttnImpl = Literal["xla", "pallas"]


@dataclasses.dataclass(frozen=True)
class ParamInfo:
    """One weight's declaration: init, sharding and the converter's shape checks all read this."""
    shape: tuple[int, ...]
    axes: tuple[str | None, ...]  # logical axis names, mapped to a mesh by sharding/rules.py
    init: Literal["normal", "ones"] = "normal"


def layer_infos(cfg: LlamaConfig) -> dict[str, ParamInfo]:
    D, H, G, K, F = cfg.dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.ffn_dim
    return {
        "attention_norm": ParamInfo((D,), ("embed",), "ones"),
        "wq": ParamInfo((D, H * K), ("embed", "heads")),
        "wk": ParamInfo((D, G * K), ("embed", "kv_heads")),
        "wv": ParamInfo((D, G * K), ("embed", "kv_heads")),
        "wo": ParamInfo((H * K, D), ("heads", "embed")),
        "ffn_norm": ParamInfo((D,), ("embed",), "ones"),
        "w1": ParamInfo((D, F), ("embed", "ffn")),  # gate
        "w3": ParamInfo((D, F), ("embed", "ffn")),  # up
        "w2": ParamInfo((F, D), ("ffn", "embed")),  # down
    }


def param_infos(cfg: LlamaConfig) -> dict[str, ParamInfo]:
    """Every weight by its flat name ("layers.3.wq"), in checkpoint order."""
    infos = {"tok_embeddings": ParamInfo((cfg.vocab_size, cfg.dim), ("vocab", "embed"))}
    for i in range(cfg.n_layers):
        infos.update({f"layers.{i}.{k}": v for k, v in layer_infos(cfg).items()})
    infos["norm"] = ParamInfo((cfg.dim,), ("embed",), "ones")
    if not cfg.tie_embeddings:
        infos["output"] = ParamInfo((cfg.dim, cfg.vocab_size), ("embed", "vocab"))
    return infos


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    attention_norm: jax.Array  # [D]
    wq: jax.Array              # [D, H*K]
    wk: jax.Array              # [D, G*K]
    wv: jax.Array              # [D, G*K]
    wo: jax.Array              # [H*K, D]
    ffn_norm: jax.Array        # [D]
    w1: jax.Array              # [D, F]
    w2: jax.Array              # [F, D]
    w3: jax.Array              # [D, F]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Params:
    tok_embeddings: jax.Array   # [V, D]
    layers: list[Layer]
    norm: jax.Array             # [D]
    output: jax.Array | None    # [D, V]; None when tied to tok_embeddings


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Static KV cache. One buffer per layer so each is updated in place by the donated step.

    An int8 cache (init_cache with dtype int8) holds k, v as int8 codes with one float32 scale
    per token and KV head: key s of head g is k[b, s, g] * k_scale[b, g, s]. Half the bytes of
    bf16 (plus 4 bytes per head_dim), which is what decode at long context reads. The scales are
    [B, G, S] so that the decode kernel reads one head's scales contiguously.
    """
    k: list[jax.Array]   # L x [B, S, G, K]
    v: list[jax.Array]   # L x [B, S, G, K]
    lengths: jax.Array   # [B] int32, tokens already cached per row
    k_scale: list[jax.Array] | None = None  # L x [B, G, S] float32 for an int8 cache, else None
    v_scale: list[jax.Array] | None = None

    @property
    def max_len(self) -> int:
        return self.k[0].shape[1]

    @property
    def quantized(self) -> bool:
        return self.k_scale is not None


KV_DTYPES = ("bfloat16", "float16", "float32", "int8")


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype=jnp.bfloat16) -> KVCache:
    """An empty cache: one jitted call (eager zeros would be one dispatch per layer buffer).

    dtype int8 makes an int8 cache with per-token, per-head scales (KVCache)."""
    dtype = jnp.dtype(dtype)
    if dtype.name not in KV_DTYPES:
        raise ValueError(f"cache dtype {dtype.name!r}; expected one of {KV_DTYPES}")
    shape = (batch, max_len, cfg.n_kv_heads, cfg.head_dim)
    zeros = [jnp.zeros(shape, dtype) for _ in range(2 * cfg.n_layers)]
    scales = None
    if dtype == jnp.int8:
        scales = [jnp.zeros((batch, cfg.n_kv_heads, max_len), jnp.float32) for _ in range(2 * cfg.n_layers)]
    return KVCache(k=zeros[:cfg.n_layers], v=zeros[cfg.n_layers:], lengths=jnp.zeros((batch,), jnp.int32),
                   k_scale=scales and scales[:cfg.n_layers], v_scale=scales and scales[cfg.n_layers:])


def to_flat(params: Params) -> dict[str, jax.Array]:
    flat = {"tok_embeddings": params.tok_embeddings}
    for i, layer in enumerate(params.layers):
        flat.update({f"layers.{i}.{f.name}": getattr(layer, f.name)
                     for f in dataclasses.fields(Layer)})
    flat["norm"] = params.norm
    if params.output is not None:
        flat["output"] = params.output
    return flat


def from_flat(flat: dict[str, jax.Array], cfg: LlamaConfig) -> Params:
    layers = [Layer(**{f.name: flat[f"layers.{i}.{f.name}"] for f in dataclasses.fields(Layer)})
              for i in range(cfg.n_layers)]
    return Params(tok_embeddings=flat["tok_embeddings"], layers=layers, norm=flat["norm"],
                  output=None if cfg.tie_embeddings else flat["output"])


def init_params(cfg: LlamaConfig, key: jax.Array, dtype=jnp.bfloat16,
                shardings: dict | None = None) -> Params:
    """Random weights (normal, std 0.02; norms at one): for tests and benchmarks.

    shardings ({flat name: sharding}) creates each weight directly in its shards. Each weight is
    made by a small program shared by all weights of its shape, so a 70B model compiles a handful
    of programs instead of one program holding 723 random generators (minutes of XLA time).
    """
    infos = param_infos(cfg)
    keys = jax.random.split(key, len(infos))
    flat = {name: _weight_initializer(info.shape, jnp.dtype(dtype), info.init,
                                      None if shardings is None else shardings[name])(k)
            for k, (name, info) in zip(keys, infos.items())}
    return from_flat(flat, cfg)


@functools.cache
def _weight_initializer(shape: tuple[int, ...], dtype, init: str, sharding):
    def make(key):
        if init == "ones":
            return jnp.ones(shape, dtype)
        return (0.02 * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    return jax.jit(make, out_shardings=sharding)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)  # [B, T, D]
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * w


def rope(x: jax.Array, pos: jax.Array, theta: float) -> jax.Array:
    """Rotate-half RoPE. x [B, T, N, K], pos [B, T] -> [B, T, N, K]; angles in float32."""
    half = x.shape[-1] // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, half, dtype=jnp.float32) / half)  # [K/2]
    angles = pos.astype(jnp.float32)[..., None] * inv_freq                      # [B, T, K/2]
    cos, sin = jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]  # [B, T, 1, K/2]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)                      # [B, T, N, K/2]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
                  kv_len: jax.Array, k_scale: jax.Array | None = None,
                  v_scale: jax.Array | None = None) -> jax.Array:
    """Causal GQA attention in plain XLA.

    q [B, T, H, K]; k, v [B, S, G, K]; query t of row b sits at position q_offset[b] + t and sees
    keys s <= its position with s < kv_len[b]. With an int8 cache, k_scale and v_scale [B, G, S]
    multiply the scores and the probabilities instead of dequantizing the cache. -> [B, T, H, K]
    """
    B, T, H, K = q.shape
    S, G = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, G, H // G, K)                                            # [B, T, G, R, K]
    scores = jnp.einsum("BTGRK,BSGK->BGRTS", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32) * K ** -0.5           # [B, G, R, T, S]
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :]                            # [B, G, 1, 1, S]
    q_pos = q_offset[:, None] + jnp.arange(T)                                     # [B, T]
    s_pos = jnp.arange(S)
    mask = (s_pos[None, None, :] <= q_pos[:, :, None]) & (s_pos < kv_len[:, None, None])  # [B, T, S]
    # A finite fill (not -inf) keeps fully masked padding rows finite.
    scores = jnp.where(mask[:, None, None], scores, -1e30)
    probs = jax.nn.softmax(scores, axis=-1)                                       # [B, G, R, T, S]
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None, :]
    out = jnp.einsum("BGRTS,BSGK->BTGRK", probs.astype(q.dtype), v.astype(q.dtype),
                     preferred_element_type=jnp.float32)
    return out.reshape(B, T, H, K).astype(q.dtype)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array, kv_len: jax.Array,
              impl: AttnImpl, k_scale: jax.Array | None = None,
              v_scale: jax.Array | None = None) -> jax.Array:
    """The one attention entry point. Shapes as in `attention_xla`."""
    if impl == "xla":
        mesh = jax.sharding.get_abstract_mesh()
        if not mesh.empty and mesh.size > 1 and _kv_replicated(q, k, mesh):
            # KV heads replicated over the model axis: left to itself XLA splits the cache's head
            # axis to match the query heads and gathers the cache back every step; per shard,
            # each device reads the one KV head its query heads use.
            from jllm import kernels
            return kernels.sharded_attention(q, k, v, q_offset, kv_len, mesh, attention_xla,
                                             k_scale=k_scale, v_scale=v_scale)
        return attention_xla(q, k, v, q_offset, kv_len, k_scale, v_scale)
    if impl == "pallas":
        from jllm import kernels
        return kernels.attention(q, k, v, q_offset, kv_len, k_scale=k_scale, v_scale=v_scale)
    raise ValueError(f"attn_impl={impl!r}; expected 'xla' or 'pallas'")


def _kv_replicated(q: jax.Array, k: jax.Array, mesh) -> bool:
    from sharding import rules
    tp = rules.axis_size(mesh, "heads")
    return tp > 1 and rules.kv_heads_rule(q.shape[2], k.shape[2], tp)["kv_heads"] is None


def _write(buf: jax.Array, new: jax.Array, start: jax.Array, fresh: bool) -> jax.Array:
    """Write new [B, T, G, K] into buf [B, S, G, K] (or scales new [B, G, T] into buf [B, G, S])
    at row offsets start [B]."""
    if fresh:  # every row starts at 0: one contiguous in-place update
        return jax.lax.dynamic_update_slice(buf, new.astype(buf.dtype), (0,) * buf.ndim)
    B, T = new.shape[0], new.shape[-1 if new.ndim == 3 else 1]
    pos = start[:, None] + jnp.arange(T)                                          # [B, T]
    if new.ndim == 3:  # scales [B, G, T]; G passes through (an index on it would make a sharded
        # scatter gather its operands): the indexed result is [B, T, G]
        return buf.at[jnp.arange(B)[:, None], :, pos].set(new.transpose(0, 2, 1), mode="drop")
    return buf.at[jnp.arange(B)[:, None], pos].set(new.astype(buf.dtype), mode="drop")


def _cache_layer(cache: KVCache, i: int, k: jax.Array, v: jax.Array, start: jax.Array,
                 fresh: bool) -> tuple:
    """Write new k, v [B, T, G, K] into layer i -> its (k, v, k_scale, v_scale) buffers with them
    written (the scales None for a float cache)."""
    if not cache.quantized:
        return (_write(cache.k[i], k, start, fresh), _write(cache.v[i], v, start, fresh), None, None)
    (kq, ks), (vq, vs) = quantize_kv(k), quantize_kv(v)
    return (_write(cache.k[i], kq, start, fresh), _write(cache.v[i], vq, start, fresh),
            _write(cache.k_scale[i], ks, start, fresh), _write(cache.v_scale[i], vs, start, fresh))


def transformer(params: Params, tokens: jax.Array, cache: KVCache, cfg: LlamaConfig, *,
                n_tokens: jax.Array | None = None, fresh: bool = False,
                attn_impl: AttnImpl = "xla", matmul_impl: str = "xla",
                ) -> tuple[jax.Array, KVCache]:
    """tokens [B, T] written at cache.lengths -> final-normed hidden [B, T, D] and the new cache.

    n_tokens [B]: real tokens per row (the rest of T is padding); default T. fresh=True promises
    every row starts empty, so attention reads only the new keys instead of the whole cache.
    """
    B, T = tokens.shape
    H, G, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if n_tokens is None:
        n_tokens = jnp.full((B,), T, jnp.int32)
    start = cache.lengths                                                         # [B]
    pos = start[:, None] + jnp.arange(T)                                          # [B, T]
    kv_len = start + n_tokens                                                     # [B]
    specs = _linear_specs(cfg)

    def linear(x, w, name):
        return quant.linear(x, w, impl=matmul_impl, spec=specs.get(name))

    def linears(x, ws, names):  # projections of one input: one kernel launch with "pallas-fused"
        return quant.linears(x, ws, impl=matmul_impl, specs=[specs.get(n) for n in names])

    x = params.tok_embeddings[tokens]                                             # [B, T, D]
    written = []
    for i, layer in enumerate(params.layers):
        # Attention block: norm, project, rotate, write the cache, attend, project back.
        h = rms_norm(x, layer.attention_norm, cfg.norm_eps)
        q, k, v = linears(h, (layer.wq, layer.wk, layer.wv), ("wq", "wk", "wv"))
        q = rope(q.reshape(B, T, H, K), pos, cfg.rope_theta)                      # [B, T, H, K]
        k = rope(k.reshape(B, T, G, K), pos, cfg.rope_theta)                      # [B, T, G, K]
        v = v.reshape(B, T, G, K)                                                 # [B, T, G, K]
        ck, cv, cks, cvs = bufs = _cache_layer(cache, i, k, v, start, fresh)
        written.append(bufs)
        if fresh:  # the new keys as computed (a float cache rounds them to its dtype first)
            kd = k.dtype if cache.quantized else ck.dtype
            o = attention(q, k.astype(kd), v.astype(kd), start, n_tokens, attn_impl)
        elif cache.quantized and T > 1:  # chunked prefill over an int8 cache: dequantize once
            o = attention(q, dequantize_kv(ck, cks, q.dtype), dequantize_kv(cv, cvs, q.dtype),
                          start, kv_len, attn_impl)
        else:  # decode reads the int8 codes and scales directly
            o = attention(q, ck, cv, start, kv_len, attn_impl, cks, cvs)          # [B, T, H, K]
        x = x + linear(o.reshape(B, T, H * K), layer.wo, "wo")
        # Feed-forward block: SwiGLU.
        h = rms_norm(x, layer.ffn_norm, cfg.norm_eps)
        gate, up = linears(h, (layer.w1, layer.w3), ("w1", "w3"))                # [B, T, F]
        x = x + linear(jax.nn.silu(gate) * up, layer.w2, "w2")
    x = rms_norm(x, params.norm, cfg.norm_eps)                                    # [B, T, D]
    ck, cv, cks, cvs = (list(b) for b in zip(*written))
    return x, KVCache(k=ck, v=cv, lengths=kv_len, k_scale=cks if cache.quantized else None,
                      v_scale=cvs if cache.quantized else None)


def logits(params: Params, h: jax.Array, matmul_impl: str = "xla") -> jax.Array:
    """h [..., D] -> float32 logits [..., V]."""
    w = params.tok_embeddings.T if params.output is None else params.output       # [D, V]
    spec = _linear_specs(None).get("output")
    return quant.linear(h, w, impl=matmul_impl, spec=spec).astype(jnp.float32)


def _linear_specs(cfg: LlamaConfig | None) -> dict:
    """{"wq": PartitionSpec, ..., "output": ...} of the float weights on the current mesh (empty
    without one): quant.linear runs the quantized kernel per shard with them."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return {}
    from sharding import rules
    specs = {"output": rules.logical_to_spec(("embed", "vocab"))}
    if cfg is not None:
        rl = rules.kv_heads_rule(cfg.n_heads, cfg.n_kv_heads, rules.axis_size(mesh, "heads"))
        specs.update({name: rules.logical_to_spec(info.axes, rl)
                      for name, info in layer_infos(cfg).items() if len(info.shape) == 2})
    return specs


def forward(params: Params, tokens: jax.Array, cache: KVCache, cfg: LlamaConfig, *,
            attn_impl: AttnImpl = "xla", matmul_impl: str = "xla",
            ) -> tuple[jax.Array, KVCache]:
    """tokens [B, T] written at cache.lengths -> logits [B, T, V] (float32) and the updated cache."""
    h, cache = transformer(params, tokens, cache, cfg, attn_impl=attn_impl, matmul_impl=matmul_impl)
    return logits(params, h, matmul_impl), cache
