"""Attention: the XLA path, the choice of Pallas kernel, and the per-shard wrapper.

Shapes: q [B, T, H, K]; a static cache's k, v [B, S, G, K] (int8 with float32 k_scale, v_scale
[B, G, S]); a paged cache's k_pages, v_pages [P, page_size, G, K] with block_tables
[B, max_pages] (scales [P, G, page_size]). Query t of row b sits at position q_offset[b] + t and
sees keys s <= its position with s < kv_len[b].

Under a mesh the kernels run per shard in shard_map: XLA cannot partition a custom call and would
otherwise gather every head onto every device.
"""
import functools
import math

import jax
import jax.numpy as jnp

from jllm.config import Rope
from jllm.plan import Plan
from pallas_kernels.decode_attention import decode_attention, decode_attention_append
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.kv_quant import dequantize_kv
from pallas_kernels.paged_attention import paged_attention as paged_decode_kernel
from pallas_kernels.paged_attention import gather_pages, gather_scale_pages, paged_attention_append, paged_attention_mq


def attention_xla(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
                  kv_len: jax.Array, k_scale: jax.Array | None = None,
                  v_scale: jax.Array | None = None) -> jax.Array:
    """Causal GQA attention in plain XLA -> [B, T, H, K].

    With an int8 cache, k_scale and v_scale [B, G, S] multiply the scores and the probabilities
    instead of dequantizing the cache.
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


def rope_frequencies(head_dim: int, rotary: Rope | float) -> jax.Array:
    """The rotate-half RoPE frequencies [K / 2] float32: pair i turns by position * inv_freq[i],
    theta^(-2i/K) as rotary.scaling stretches it (rotary: LlamaConfig.rope, or a bare theta).

    In float32 throughout, in the order Hugging Face computes them: its values to float32 rounding."""
    rotary = rotary if isinstance(rotary, Rope) else Rope(rotary)
    half, s = head_dim // 2, rotary.scaling
    inv_freq = 1.0 / rotary.theta ** (jnp.arange(0, half, dtype=jnp.float32) / half)
    if s is None:
        return inv_freq
    if s.kind == "linear":  # positions / factor
        return inv_freq / s.factor
    if s.kind == "yarn":
        return _yarn(inv_freq, head_dim, rotary.theta, s)
    # llama3 (Meta's Llama 3.1 reference): pairs whose wavelength fits original_max_position
    # high_freq_factor times keep their frequency, those it fits fewer than low_freq_factor times
    # (long waves: the context the model never saw a full turn of) turn factor times slower, and
    # those between blend the two linearly in original_max_position / wavelength.
    wavelen = 2 * math.pi / inv_freq
    smooth = (s.original_max_position / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    return jnp.where(wavelen < s.original_max_position / s.high_freq_factor, inv_freq,
                     jnp.where(wavelen > s.original_max_position / s.low_freq_factor, inv_freq / s.factor, blended))


def _yarn(inv_freq: jax.Array, head_dim: int, theta: float, s) -> jax.Array:
    """YaRN: pair i keeps inv_freq[i] below the ramp, takes inv_freq[i] / factor above it, and
    blends linearly in i across it. The ramp runs over the pair indices whose wavelength fits
    original_max_position beta_fast down to beta_slow times (in transformers' float32 order)."""
    def pair(turns):  # the (fractional) pair index that turns `turns` times in original_max_position
        return head_dim * math.log(s.original_max_position / (turns * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair(s.beta_fast), pair(s.beta_slow)
    if s.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001  # no zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    keep = 1 - ramp
    return inv_freq / s.factor * (1 - keep) + inv_freq * keep


def rope(x: jax.Array, pos: jax.Array, rotary: Rope | float) -> jax.Array:
    """Rotate-half RoPE. x [B, T, N, K], pos [B, T] -> [B, T, N, K]; angles in float32.

    With x = (x1, x2) halves: (x1 cos - x2 sin, x2 cos + x1 sin), written as x * cos + reversed
    halves * (-sin, sin): elementwise with a reversed index, which XLA fuses into one pass where a
    concatenate of the two halves ran as a slow kernel of its own (prefill)."""
    B, T, N, K = x.shape
    angles = pos.astype(jnp.float32)[..., None] * rope_frequencies(K, rotary)  # [B, T, K/2]
    cos, sin = jnp.cos(angles)[:, :, None, None, :], jnp.sin(angles)[:, :, None, None, :]  # [B, T, 1, 1, K/2]
    halves = x.astype(jnp.float32).reshape(B, T, N, 2, K // 2)                  # [B, T, N, 2, K/2]
    signed_sin = sin * jnp.array([-1.0, 1.0], jnp.float32)[:, None]             # [B, T, 1, 2, K/2]
    return (halves * cos + halves[..., ::-1, :] * signed_sin).reshape(B, T, N, K).astype(x.dtype)


def supported(q: jax.Array, k: jax.Array) -> bool:
    """Shapes the Triton kernels tile: head_dim a power of two >= 16, a power-of-two GQA ratio."""
    K, R = q.shape[-1], q.shape[2] // k.shape[2]
    return K >= 16 and K & (K - 1) == 0 and R & (R - 1) == 0


def _kernel_attention(q, k, v, q_offset, kv_len, k_scale=None, v_scale=None, *, interpret: bool):
    """One device's attention through the Pallas kernels (the XLA path for shapes they don't tile)."""
    if not supported(q, k) or (k_scale is not None and q.shape[1] > 1):
        # The model dequantizes an int8 cache itself before a multi-token step, so the second
        # case is a direct caller's.
        return attention_xla(q, k, v, q_offset, kv_len, k_scale, v_scale)
    if q.shape[1] == 1 and k_scale is not None and q.shape[2] == k.shape[2]:
        # int8 cache, one query head per KV head: the paged kernel's FMA path, each row its own
        # page of S slots (the static [B, G, S] scales are those pages' scales as they are)
        rows = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]                    # [B, 1] tables
        return paged_decode_kernel(q[:, 0], k, v, rows, kv_len, k_scale_pages=k_scale, v_scale_pages=v_scale,
                                   interpret=interpret)[:, None]
    if q.shape[1] == 1:  # decode: the one query sits at kv_len - 1 and sees every cached key
        return decode_attention(q[:, 0], k, v, kv_len, k_scale=k_scale, v_scale=v_scale,
                                interpret=interpret)[:, None]
    return flash_attention(q, k, v, q_offset, kv_len, interpret=interpret)


def per_shard(local, plan: Plan, q: jax.Array, kv: tuple, rows: tuple, kv_axes: tuple,
              scales: tuple = (), scale_axes: tuple = ()) -> jax.Array:
    """Run `local(q, *kv, *rows, *scales)` per shard: batch over data, query heads over model,
    KV heads (and an int8 cache's scales) split or replicated per the plan.

    kv_axes / scale_axes name the logical axes of the kv and scale arrays (a static cache's
    ("batch", "seq", "kv_heads", "head_dim"), a paged pool's (None, None, "kv_heads", "head_dim")).
    With replicated KV heads each shard's query heads all read one KV head, which is sliced out.
    Without a sharded plan `local` runs once, on the whole arrays.
    """
    if not plan.sharded:
        return local(q, *kv, *rows, *scales)
    G = kv[0].shape[kv_axes.index("kv_heads")]
    g_axis, s_axis = kv_axes.index("kv_heads"), scale_axes.index("kv_heads") if scales else 0
    q_spec = plan.spec(("batch", "seq", "heads", "head_dim"))
    kv_spec, scale_spec = plan.spec(kv_axes), plan.spec(scale_axes) if scales else None
    row_specs = tuple(plan.spec(("batch",) + (None,) * (r.ndim - 1)) for r in rows)
    n_kv, n_rows = len(kv), len(rows)

    def run(q, *args):
        kv_, rows_, scales_ = args[:n_kv], args[n_kv:n_kv + n_rows], args[n_kv + n_rows:]
        if plan.kv_replicated:  # rules.kv_heads_rule: this shard's query heads read KV head g
            g = jax.lax.axis_index(plan.rules["heads"]) * G // plan.tp
            kv_ = [jax.lax.dynamic_slice_in_dim(a, g, 1, axis=g_axis) for a in kv_]
            scales_ = [jax.lax.dynamic_slice_in_dim(a, g, 1, axis=s_axis) for a in scales_]
        return local(q, *kv_, *rows_, *scales_)

    in_specs = (q_spec,) + (kv_spec,) * n_kv + row_specs + (scale_spec,) * len(scales)
    return jax.shard_map(run, mesh=plan.mesh, in_specs=in_specs, out_specs=q_spec,
                         check_vma=False)(q, *kv, *rows, *scales)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array, kv_len: jax.Array,
              plan: Plan, k_scale: jax.Array | None = None,
              v_scale: jax.Array | None = None) -> jax.Array:
    """Attention over a static cache, as the plan says -> [B, T, H, K]."""
    if plan.attn_impl == "pallas":
        local = functools.partial(_kernel_attention, interpret=plan.interpreted)
    elif plan.sharded and plan.kv_replicated:
        # KV heads replicated over the model axis: left to itself XLA splits the cache's head axis
        # to match the query heads and gathers the cache back every step; per shard, each device
        # reads the one KV head its query heads use.
        local = attention_xla
    else:
        return attention_xla(q, k, v, q_offset, kv_len, k_scale, v_scale)
    scales = () if k_scale is None else (k_scale, v_scale)
    return per_shard(local, plan, q, (k, v), (q_offset, kv_len), ("batch", "seq", "kv_heads", "head_dim"),
                     scales, ("batch", "kv_heads", "seq"))


def decode_append(q: jax.Array, k: jax.Array, v: jax.Array, k_new: jax.Array, v_new: jax.Array,
                  lengths: jax.Array, kv_len: jax.Array, plan: Plan, rotary: Rope | float | None = None,
                  ) -> tuple | None:
    """One decode step over a static float cache with the write in the attention kernel: q
    [B, 1, H, K], k_new, v_new [B, 1, G, K] stored at lengths -> (out [B, 1, H, K], k, v); with
    rotary (LlamaConfig.rope), q and k_new come before RoPE and the kernel rotates them at lengths
    by its frequencies. None where the plan runs no kernels on one device, or the shapes don't
    tile (the caller writes, then attends)."""
    if plan.attn_impl != "pallas" or plan.sharded or not supported(q, k):
        return None
    inv_freq = None if rotary is None else rope_frequencies(q.shape[-1], rotary)
    out, k, v = decode_attention_append(q[:, 0], k, v, lengths, kv_len, k_new[:, 0], v_new[:, 0],
                                        inv_freq=inv_freq, interpret=plan.interpreted)
    return out[:, None], k, v


def decode_append_int8(q: jax.Array, k: jax.Array, v: jax.Array, k_scale: jax.Array, v_scale: jax.Array,
                       k_new: jax.Array, v_new: jax.Array, lengths: jax.Array, kv_len: jax.Array, plan: Plan,
                       rotary: Rope | float) -> tuple | None:
    """`decode_append` over a static int8 cache (k, v [B, S, G, K] int8 with k_scale, v_scale
    [B, G, S]) with one query head per KV head: q [B, 1, H, K] and k_new, v_new [B, 1, G, K]
    before RoPE (rotated here, at lengths), the new key and value rounded to int8 and stored at
    lengths by the kernel -> (out [B, 1, H, K], k, v, k_scale, v_scale). None where the plan runs
    no kernels on one device or the shapes don't take that kernel (the caller writes, then
    attends)."""
    if (plan.attn_impl != "pallas" or plan.sharded or not supported(q, k) or q.shape[1] != 1
            or q.shape[2] != k.shape[2]):
        return None
    pos = lengths[:, None]                                                            # [B, 1]
    q, k_new = rope(q, pos, rotary), rope(k_new, pos, rotary)
    rows = jnp.arange(q.shape[0], dtype=jnp.int32)[:, None]  # [B, 1] tables: row b is page b of S slots
    out, k, v, k_scale, v_scale = paged_attention_append(
        q[:, 0], k, v, rows, lengths, kv_len, k_new[:, 0], v_new[:, 0], k_scale_pages=k_scale,
        v_scale_pages=v_scale, interpret=plan.interpreted)
    return out[:, None], k, v, k_scale, v_scale


def _paged_xla(q, k_pages, v_pages, block_tables, q_offset, kv_len, k_scale_pages=None,
               v_scale_pages=None):
    """Paged attention in XLA: gather each row's pages into a contiguous cache, then attend."""
    k, v = gather_pages(k_pages, block_tables), gather_pages(v_pages, block_tables)
    if k_scale_pages is None:
        return attention_xla(q, k, v, q_offset, kv_len)
    ks, vs = gather_scale_pages(k_scale_pages, block_tables), gather_scale_pages(v_scale_pages, block_tables)
    if q.shape[1] > 1:  # a prompt chunk: dequantize once, as over a static int8 cache
        return attention_xla(q, dequantize_kv(k, ks, q.dtype), dequantize_kv(v, vs, q.dtype), q_offset, kv_len)
    return attention_xla(q, k, v, q_offset, kv_len, ks, vs)


def _paged_kernel(q, k_pages, v_pages, block_tables, q_offset, kv_len, *scales, interpret: bool):
    if not supported(q, k_pages):
        return _paged_xla(q, k_pages, v_pages, block_tables, q_offset, kv_len, *scales)
    ks, vs = scales or (None, None)
    if q.shape[1] == 1:  # decode: one query per row, at kv_len - 1
        return paged_decode_kernel(q[:, 0], k_pages, v_pages, block_tables, kv_len, k_scale_pages=ks,
                                   v_scale_pages=vs, interpret=interpret)[:, None]
    # A prompt chunk: queries q_offset + t for t < kv_len - q_offset, the rest padding (zeros).
    return paged_attention_mq(q, k_pages, v_pages, block_tables, kv_len, q_offset, kv_len - q_offset,
                              k_scale_pages=ks, v_scale_pages=vs, interpret=interpret)


def paged_attention(q: jax.Array, k_pages: jax.Array, v_pages: jax.Array, block_tables: jax.Array,
                    q_offset: jax.Array, kv_len: jax.Array, plan: Plan,
                    k_scale_pages: jax.Array | None = None,
                    v_scale_pages: jax.Array | None = None) -> jax.Array:
    """Attention over a paged cache, as the plan says -> [B, T, H, K]."""
    scales = () if k_scale_pages is None else (k_scale_pages, v_scale_pages)
    if plan.attn_impl == "pallas":
        local = functools.partial(_paged_kernel, interpret=plan.interpreted)
    else:
        local = _paged_xla
    # The pool's page axes are not sharded; block tables and lengths follow the batch.
    return per_shard(local, plan, q, (k_pages, v_pages), (block_tables, q_offset, kv_len),
                     (None, None, "kv_heads", "head_dim"), scales, (None, "kv_heads", None))
