"""Llama-2 and Llama-3.x as pure functions over a params pytree.

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
from jllm.kvcache import KVCache, PagedKVCache, init_cache  # noqa: F401 (forward's caches, re-exported)
from jllm.plan import Plan
from jllm.quant import rms_norm

Cache = KVCache | PagedKVCache


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


def transformer(params: Params, tokens: jax.Array, cache: Cache, cfg: LlamaConfig,
                plan: Plan = Plan(), *, n_tokens: jax.Array | None = None, fresh: bool = False,
                only: jax.Array | None = None) -> tuple[jax.Array, Cache]:
    """tokens [B, T] written at cache.lengths -> final-normed hidden [B, T, D] and the new cache.

    n_tokens [B]: real tokens per row (the rest of T is padding); default T. fresh=True promises
    every row starts empty, so attention reads only the new keys instead of the whole cache.
    only [B, P] (positions in T): the hidden states of just those positions, [B, P, D]. Every
    position's keys and values are still cached, but the last layer's output projection and
    feed-forward block run on P positions per row, not T (a prefill needs one: about 2% of a 7B
    prefill's matmuls saved).
    """
    B, T = tokens.shape
    H, G, K = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    if n_tokens is None:
        n_tokens = jnp.full((B,), T, jnp.int32)
    pos = cache.positions(T)                                                      # [B, T]
    specs = linear_specs(cfg, plan)

    def linear(x, w, name):
        return quant.linear(x, w, plan, spec=specs.get(name))

    def normed_linears(x, norm, ws, names):  # rms_norm(x) @ each w: one launch with "pallas-fused"
        return quant.linears(x, ws, plan, specs=[specs.get(n) for n in names], norm=norm, eps=cfg.norm_eps)

    x = params.tok_embeddings[tokens]                                             # [B, T, D]
    written = []
    for i, layer in enumerate(params.layers):
        # Attention block: norm, project, rotate, write the cache, attend, project back.
        q, k, v = normed_linears(x, layer.attention_norm, (layer.wq, layer.wk, layer.wv), ("wq", "wk", "wv"))
        q, k, v = q.reshape(B, T, H, K), k.reshape(B, T, G, K), v.reshape(B, T, G, K)
        if cfg.rope.attention_scale != 1.0:  # YaRN scales the scores; RoPE is linear, so q carries it
            q = (q.astype(jnp.float32) * cfg.rope.attention_scale).astype(q.dtype)
        layer_kv, o = cache.write_attend(i, q, k, v, pos, n_tokens, fresh, plan, cfg.rope)  # [B, T, H, K]
        written.append(layer_kv)
        if only is not None and i == len(params.layers) - 1:  # past here, rows are independent
            x = jnp.take_along_axis(x, only[:, :, None], axis=1)                  # [B, P, D]
            o = jnp.take_along_axis(o, only[:, :, None, None], axis=1)            # [B, P, H, K]
            T = only.shape[1]
        x = x + linear(o.reshape(B, T, H * K), layer.wo, "wo")
        # Feed-forward block: SwiGLU.
        gate, up = normed_linears(x, layer.ffn_norm, (layer.w1, layer.w3), ("w1", "w3"))  # [B, T, F]
        x = x + linear(jax.nn.silu(gate) * up, layer.w2, "w2")
    x = rms_norm(x, params.norm, cfg.norm_eps)                                    # [B, T, D]
    return x, cache.updated(written, n_tokens)


def logits(params: Params, h: jax.Array, plan: Plan = Plan()) -> jax.Array:
    """h [..., D] -> float32 logits [..., V]."""
    w = params.tok_embeddings.T if params.output is None else params.output       # [D, V]
    spec = plan.spec(("embed", "vocab")) if plan.sharded else None
    return quant.linear(h, w, plan, spec=spec).astype(jnp.float32)


def linear_specs(cfg: LlamaConfig, plan: Plan) -> dict:
    """{"wq": PartitionSpec, ...} of the float weights under the plan's mesh (empty without one):
    quant.linear runs the Pallas kernels per shard with them."""
    if not plan.sharded:
        return {}
    return {name: plan.spec(info.axes) for name, info in layer_infos(cfg).items() if len(info.shape) == 2}


def forward(params: Params, tokens: jax.Array, cache: Cache, cfg: LlamaConfig, plan: Plan = Plan(),
            ) -> tuple[jax.Array, Cache]:
    """tokens [B, T] written at cache.lengths -> logits [B, T, V] (float32) and the updated cache."""
    h, cache = transformer(params, tokens, cache, cfg, plan)
    return logits(params, h, plan), cache
