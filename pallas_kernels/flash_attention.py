"""Causal prefill attention (FlashAttention-2 forward) in Pallas, Triton backend.

Query token t of row b sits at absolute position q_offset[b] + t and attends key s when
s <= q_offset[b] + t and s < kv_len[b]. First prefill passes the new chunk as k/v (S == T,
q_offset = 0); chunked prefill passes the whole static cache (q_offset = tokens already cached).

Layouts follow the model: q, out [B, T, H, K]; k, v [B, S, G, K] with H = G * R. One program owns
`block_q // R` query tokens times the R query heads of one KV head, so the score tile is
[block_q, block_k] and each K/V block is loaded once for the whole group (GQA without repeating
K/V). The KV loop runs in two phases: blocks that every row of the tile sees in full (no mask
arithmetic) and the few blocks on the causal diagonal or at kv_len (masked). Blocks past the
diagonal or past kv_len are never loaded, so the work scales with the real lengths.
"""
import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels import _triton

# Finite stand-in for -inf: a fully masked row then never computes inf - inf.
_MASK_VALUE = -1e30
_LOG2_E = math.log2(math.e)


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiling of the flash kernel.

    block_q: rows of the score tile, i.e. query tokens times the R query heads of a KV group
        (a tile holds block_q // R tokens). block_k: keys per inner-loop step.
    """
    block_q: int = 128
    block_k: int = 64
    num_warps: int = 8
    num_stages: int = 3

    def __post_init__(self):
        for name in ("block_q", "block_k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 16 or not _is_pow2(value):
                raise ValueError(f"{name}={value!r} must be a power of 2 and >= 16")
        if self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or self.num_stages < 1:
            raise ValueError(f"num_stages={self.num_stages!r} must be an int >= 1")


def default_block_sizes(head_dim: int, group: int, dtype=jnp.bfloat16) -> BlockSizes:
    """Tiles measured best on an H100 (docs/perf_attention.md) for 16-bit inputs; float32 tiles
    are half as deep (the folded 128 x 128 tile of 4-byte keys asked for 384 KiB of shared memory
    on an H200, which has 227)."""
    if jnp.dtype(dtype).itemsize > 2:
        return BlockSizes(block_q=64, block_k=32, num_warps=4, num_stages=2)
    if group >= 4 and head_dim >= 128:  # folded GQA tile: 128 rows = 16 tokens x 8 heads
        return BlockSizes(block_q=128, block_k=128, num_warps=8, num_stages=3)
    return BlockSizes(block_q=64, block_k=64, num_warps=4, num_stages=3)


def _flash_kernel(
    q_offset_ref,  # [B] int32
    kv_len_ref,  # [B] int32
    q_ref,  # [block_t, R, K], or [block_t, K] when R == 1
    k_ref,  # [S, K] (kv head g of row b)
    v_ref,  # [S, K]
    o_ref,  # same as q_ref
    *,
    block_t: int,
    block_k: int,
    group: int,
    seq_len: int,
    num_q_blocks: int,
    scale: float,
):
    """One tile of block_t tokens x R heads against the visible keys of one KV head."""
    b = pl.program_id(1)
    # Heaviest tiles (last along T) are launched first so the causal tail balances across SMs.
    qi = num_q_blocks - 1 - pl.program_id(2)
    head_dim = k_ref.shape[-1]
    rows = block_t * group
    q_offset = q_offset_ref[b]
    kv_len = jnp.minimum(kv_len_ref[b], k_ref.shape[0])  # never read past the cache

    t0 = qi * block_t
    first_pos = q_offset + t0  # position of the tile's first token
    # Keys [0, full_end) are visible to every row of the tile; keys >= end to none of them.
    end = jnp.minimum(first_pos + block_t, kv_len)
    full_end = jnp.minimum(first_pos + 1, kv_len)
    live = first_pos < kv_len  # a tile made only of padding rows does no work
    num_full = jnp.where(live, full_end // block_k, 0)
    num_all = jnp.where(live, pl.cdiv(end, block_k), 0)

    token_ok = t0 + jnp.arange(block_t) < seq_len  # [block_t] rows inside the array
    if group == 1:
        q = plgpu.load(q_ref, mask=token_ok[:, None], other=0.0)  # [block_t, K]
    else:
        q = plgpu.load(q_ref, mask=token_ok[:, None, None], other=0.0)  # [block_t, R, K]
        q = q.reshape(rows, head_dim)  # [rows, K], row = token * R + head
    row_pos = first_pos + jnp.arange(rows) // group  # [rows] absolute query positions
    qk_scale = scale * _LOG2_E  # softmax in base 2: exp(x) = exp2(x * log2(e))

    def step(j, carry, *, masked: bool):
        acc, m, l = carry  # [rows, K] f32, [rows] f32, [rows] f32
        start = j * block_k
        kv_slice = pl.ds(start, block_k)
        if masked:
            key_pos = start + jnp.arange(block_k)  # [block_k]
            key_ok = key_pos < kv_len
            k = plgpu.load(k_ref.at[kv_slice, :], mask=key_ok[:, None], other=0.0)  # [block_k, K]
            v = plgpu.load(v_ref.at[kv_slice, :], mask=key_ok[:, None], other=0.0)  # [block_k, K]
        else:
            k = plgpu.load(k_ref.at[kv_slice, :])  # [block_k, K]
            v = plgpu.load(v_ref.at[kv_slice, :])  # [block_k, K]
        # [rows, block_k] f32 scores; the running max m stays in these units, and the softmax
        # scale goes into exp2's argument as one FMA per score: exp2(s * c - m * c)
        s = plgpu.dot(q, k, trans_b=True, allow_tf32=_triton.tf32_ok(q))
        if masked:
            visible = (key_pos[None, :] <= row_pos[:, None]) & key_ok[None, :]
            s = jnp.where(visible, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))  # [rows]
        mc = m_new * qk_scale
        alpha = jnp.exp2(m * qk_scale - mc)  # [rows] rescales the old sums
        p = jnp.exp2(s * qk_scale - mc[:, None])  # [rows, block_k]
        l = l * alpha + jnp.sum(p, axis=1)
        acc = acc * alpha[:, None] + plgpu.dot(p.astype(v.dtype), v, allow_tf32=_triton.tf32_ok(v))
        return acc, m_new, l

    carry = (
        jnp.zeros((rows, head_dim), jnp.float32),
        jnp.full((rows,), -jnp.inf, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
    )
    carry = lax.fori_loop(0, num_full, functools.partial(step, masked=False), carry)
    carry = lax.fori_loop(num_full, num_all, functools.partial(step, masked=True), carry)
    acc, _, l = carry

    # Padding rows (position >= kv_len) and skipped tiles write zeros, never 0/0.
    row_ok = (row_pos < kv_len) & (l > 0.0)
    out = jnp.where(row_ok[:, None], acc / jnp.where(row_ok, l, 1.0)[:, None], 0.0)
    out = out.astype(o_ref.dtype)  # [rows, K]
    if group == 1:
        plgpu.store(o_ref, out, mask=token_ok[:, None])
    else:
        plgpu.store(o_ref, out.reshape(block_t, group, head_dim), mask=token_ok[:, None, None])


def _flash_call(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, G, K]
    v: jax.Array,  # [B, S, G, K]
    q_offset: jax.Array,  # [B] int32
    kv_len: jax.Array,  # [B] int32
    block_sizes: BlockSizes,
    interpret: bool,
) -> jax.Array:  # [B, T, H, K]
    batch, seq_len, num_heads, head_dim = q.shape
    kv_seq_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    # Shrink the tile for short inputs, keeping >= 16 rows for the tensor-core dot.
    block_t = max(1, block_sizes.block_q // group)
    while block_t > 1 and block_t // 2 >= seq_len and (block_t // 2) * group >= 16:
        block_t //= 2
    block_k = min(block_sizes.block_k, max(16, pl.next_power_of_2(kv_seq_len)))
    num_q_blocks = pl.cdiv(seq_len, block_t)

    head_block = None if group == 1 else group  # None squeezes the head axis out of the ref
    q_spec = pl.BlockSpec(
        (None, block_t, head_block, head_dim), lambda g, b, i: (b, num_q_blocks - 1 - i, g, 0)
    )
    kv_spec = pl.BlockSpec((None, kv_seq_len, None, head_dim), lambda g, b, i: (b, 0, g, 0))
    scalar_spec = pl.BlockSpec((batch,), lambda g, b, i: (0,))
    kernel = functools.partial(
        _flash_kernel,
        block_t=block_t,
        block_k=block_k,
        group=group,
        seq_len=seq_len,
        num_q_blocks=num_q_blocks,
        scale=1.0 / math.sqrt(head_dim),
    )
    return pl.pallas_call(
        kernel,
        grid=(num_kv_heads, batch, num_q_blocks),
        in_specs=[scalar_spec, scalar_spec, q_spec, kv_spec, kv_spec],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_triton.compiler_params(block_sizes.num_warps, block_sizes.num_stages),
        interpret=interpret,
        name="jllm_flash_attention",
    )(q_offset, kv_len, q, k, v)


def _check_shapes(q: jax.Array, k: jax.Array, v: jax.Array) -> None:
    if q.ndim != 4 or k.ndim != 4 or k.shape != v.shape:
        raise ValueError(f"expected q [B, T, H, K], k = v [B, S, G, K]; got {q.shape=} {k.shape=} {v.shape=}")
    batch, _, num_heads, head_dim = q.shape
    if k.shape[0] != batch or k.shape[3] != head_dim:
        raise ValueError(f"batch or head_dim differ: {q.shape=} {k.shape=}")
    if num_heads % k.shape[2]:
        raise ValueError(f"{num_heads=} not divisible by num_kv_heads={k.shape[2]}")
    if not _is_pow2(head_dim) or head_dim < 16:
        raise ValueError(f"{head_dim=} must be a power of 2 >= 16 (Triton tiles); use flash_attention_ref")
    if not _is_pow2(num_heads // k.shape[2]):
        raise ValueError(f"group size {num_heads // k.shape[2]} must be a power of 2; use flash_attention_ref")


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def flash_attention(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, G, K]
    v: jax.Array,  # [B, S, G, K]
    q_offset: jax.Array,  # [B] int32
    kv_len: jax.Array,  # [B] int32
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Causal attention of q [B, T, H, K] over k, v [B, S, G, K] -> [B, T, H, K] in q.dtype.

    Rows whose position q_offset + t is >= kv_len are padding and come back as zeros.
    """
    _check_shapes(q, k, v)
    if block_sizes is None:
        block_sizes = default_block_sizes(q.shape[-1], q.shape[2] // k.shape[2], q.dtype)
    if q.shape[2] // k.shape[2] > block_sizes.block_q:
        raise ValueError(f"group size {q.shape[2] // k.shape[2]} exceeds {block_sizes.block_q=}")
    q_offset = q_offset.astype(jnp.int32)
    kv_len = kv_len.astype(jnp.int32)
    return _flash_call(q, k, v, q_offset, kv_len, block_sizes, interpret)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret"))
def flash_attention_ref(
    q: jax.Array,  # [B, T, H, K]
    k: jax.Array,  # [B, S, G, K]
    v: jax.Array,  # [B, S, G, K]
    q_offset: jax.Array,  # [B] int32
    kv_len: jax.Array,  # [B] int32
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Pure-jnp float32 twin of flash_attention: [B, T, H, K], zeros on padding rows."""
    del block_sizes, interpret
    batch, seq_len, num_heads, head_dim = q.shape
    kv_seq_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    qf = q.astype(jnp.float32).reshape(batch, seq_len, num_kv_heads, group, head_dim)  # [B, T, G, R, K]
    logits = jnp.einsum("btgrk,bsgk->bgrts", qf, k.astype(jnp.float32)) / math.sqrt(head_dim)
    pos = q_offset[:, None] + jnp.arange(seq_len)[None, :]  # [B, T]
    key = jnp.arange(kv_seq_len)  # [S]
    visible = (key[None, None, :] <= pos[:, :, None]) & (key[None, None, :] < kv_len[:, None, None])  # [B, T, S]
    logits = jnp.where(visible[:, None, None], logits, _MASK_VALUE)  # [B, G, R, T, S]
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bgrts,bsgk->btgrk", probs, v.astype(jnp.float32))  # [B, T, G, R, K]
    row_ok = pos < kv_len[:, None]  # [B, T]
    out = jnp.where(row_ok[:, :, None, None, None], out, 0.0)
    return out.reshape(q.shape).astype(q.dtype)
