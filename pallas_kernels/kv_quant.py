"""The int8 KV cache's rounding, shared by the model's cache writes and the attention kernels.

Symmetric absmax per token and KV head: codes int8 [.., T, G, K] and float32 scales [.., G, T]
(the scales are laid out [B, G, S] so that one head's scales are contiguous for the kernels).
Pure jnp; no kernel here.
"""
import jax
import jax.numpy as jnp
import numpy as np


# max|x| times this (float32) is the scale, and the codes are x times 1 / scale: products, so the
# rounding is the same wherever it runs (XLA may rewrite a division by a constant as a product;
# the decode kernel that quantizes a new key multiplies the same way).
INV_127 = np.float32(1 / 127)


def quantize_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The int8 cache's rounding: x [B, T, G, K] -> int8 codes [B, T, G, K] and float32 scales
    [B, G, T], symmetric absmax per token and head, so |dequantized - x| <= scale / 2 =
    max|x| / 254 elementwise, to float32 rounding (an all-zero row gets scale 0 and codes 0).
    In float32: scale = max|x| * INV_127, codes = round-half-even(x * (1 / scale)), clipped."""
    x32 = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x32), axis=-1) * INV_127  # [B, T, G]
    inv = 1.0 / jnp.where(scale == 0, 1.0, scale)
    codes = jnp.round(x32 * inv[..., None])
    return jnp.clip(codes, -127, 127).astype(jnp.int8), scale.transpose(0, 2, 1)


def dequantize_kv(q: jax.Array, scale: jax.Array, dtype) -> jax.Array:
    """int8 q [B, S, G, K] and scale [B, G, S] -> [B, S, G, K] in dtype."""
    return (q.astype(jnp.float32) * scale.transpose(0, 2, 1)[..., None]).astype(dtype)
