"""flash_attention against flash_attention_ref: Pallas interpret mode on the CPU, and the same
tests compiled on a GPU (`pytest -m gpu`; kernel_checks.MODES).

Interpret mode fills pallas outputs with NaN before the kernel runs and pads out-of-bounds reads
with NaN, so "no NaN where the reference is finite" also proves every output element was written
and no unmasked read crossed the end of an array.
"""
import warnings
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import _triton
from pallas_kernels.flash_attention import BlockSizes, flash_attention, flash_attention_ref
from kernel_checks import GPU, MODES, assert_close, gpu_marked_needs_gpu, reference  # noqa: F401 (autouse fixture)

# Relative L2 error and max abs error bounds per dtype: float32 runs the same math in a different
# order; bf16 also rounds the probabilities before the PV dot and the output.
SMALL = BlockSizes(block_q=32, block_k=16, num_warps=4, num_stages=2)

# (B, T, S, H, G, K, dtype, q_offset, kv_len)
CASES = [
    (1, 40, 40, 2, 2, 64, jnp.float32, [0], [40]),
    (3, 40, 40, 8, 2, 64, jnp.bfloat16, [0, 0, 0], [40, 1, 16]),  # GQA 4; full, 1, block boundary
    (3, 33, 33, 8, 1, 128, jnp.float32, [0, 0, 0], [33, 17, 1]),  # GQA 8, T not a block multiple
    (1, 100, 100, 4, 4, 128, jnp.bfloat16, [0], [100]),
    (3, 24, 120, 8, 1, 64, jnp.float32, [0, 40, 96], [24, 64, 120]),  # chunked prefill, GQA 8
    (2, 20, 150, 8, 2, 128, jnp.bfloat16, [100, 3], [120, 23]),  # chunked prefill, GQA 4
    (2, 48, 48, 4, 4, 64, jnp.float32, [0, 0], [10, 0]),  # padding rows; an empty row
    (2, 1, 64, 8, 1, 64, jnp.float32, [10, 63], [11, 64]),  # one-token chunk at the cache end
]


def _case_id(case) -> str:
    B, T, S, H, G, K, dtype, *_ = case
    return f"{B=}_{T=}_{S=}_{H=}_{G=}_{K=}_{jnp.dtype(dtype).name}"


def _inputs(case, case_id: str):
    B, T, S, H, G, K, dtype, q_offset, kv_len = case
    kq, kk, kv = jax.random.split(jax.random.key(zlib.crc32(case_id.encode())), 3)
    q = jax.random.normal(kq, (B, T, H, K), jnp.float32).astype(dtype)  # [B, T, H, K]
    k = jax.random.normal(kk, (B, S, G, K), jnp.float32).astype(dtype)  # [B, S, G, K]
    v = jax.random.normal(kv, (B, S, G, K), jnp.float32).astype(dtype)  # [B, S, G, K]
    return q, k, v, jnp.array(q_offset, jnp.int32), jnp.array(kv_len, jnp.int32)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_flash_matches_ref(case, interpret):
    q, k, v, q_offset, kv_len = _inputs(case, _case_id(case))
    ref = reference(flash_attention_ref, q, k, v, q_offset, kv_len)
    out = flash_attention(q, k, v, q_offset, kv_len, block_sizes=SMALL, interpret=interpret)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, ref, case[6])


@pytest.mark.parametrize("interpret", MODES)
def test_flash_default_blocks_gqa_matches_ref(interpret):
    case = (1, 70, 70, 16, 2, 128, jnp.float32, [0], [70])  # default tiles fold 8 heads x 16 tokens
    q, k, v, q_offset, kv_len = _inputs(case, "default_blocks")
    assert_close(flash_attention(q, k, v, q_offset, kv_len, interpret=interpret),
                 reference(flash_attention_ref, q, k, v, q_offset, kv_len), jnp.float32)


# Compiled only (too large for interpret mode): Llama shapes with default tiles, ragged kv_len,
# chunked-prefill offsets, GQA and both head dims.
LONG_CASES = [
    (3, 300, 300, 32, 32, 128, jnp.bfloat16, [0, 0, 0], [300, 1, 129]),
    (3, 300, 300, 64, 8, 128, jnp.bfloat16, [0, 0, 0], [300, 77, 256]),
    (2, 200, 1000, 32, 8, 64, jnp.bfloat16, [0, 700], [150, 900]),
    (2, 64, 1000, 32, 32, 128, jnp.bfloat16, [512, 936], [576, 1000]),
]


@GPU
@pytest.mark.parametrize("case", LONG_CASES, ids=[_case_id(c) for c in LONG_CASES])
def test_flash_long_ragged_rows_match_ref(case):
    q, k, v, q_offset, kv_len = _inputs(case, _case_id(case))
    out = flash_attention(q, k, v, q_offset, kv_len)
    assert_close(out, reference(flash_attention_ref, q, k, v, q_offset, kv_len), case[6])


@GPU
def test_triton_quiet_hides_the_lowering_warnings():
    """jax 0.11 warns at every Pallas-Triton lowering; inside _triton.quiet() none is left (a shape
    no other test compiles, so this call lowers)."""
    q, k, v, q_offset, kv_len = _inputs((1, 72, 72, 2, 2, 32, jnp.bfloat16, [0], [72]), "warnings")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with _triton.quiet():
            jax.block_until_ready(flash_attention(q, k, v, q_offset, kv_len))
    left = [f"{w.category.__name__}: {w.message}" for w in caught if "riton" in str(w.message)]
    assert not left, left


@pytest.mark.parametrize("interpret", MODES)
def test_flash_padding_rows_are_zero_and_cache_tail_never_read(interpret):
    """Rows at positions >= kv_len come back as zeros; NaN past kv_len in the cache never leaks."""
    case = (2, 24, 64, 4, 2, 64, jnp.float32, [8, 0], [20, 5])
    q, k, v, q_offset, kv_len = _inputs(case, "padding")
    ref = reference(flash_attention_ref, q, k, v, q_offset, kv_len)
    tail = (jnp.arange(64)[None, :] >= kv_len[:, None])[:, :, None, None]  # [B, S, 1, 1]
    k_bad, v_bad = jnp.where(tail, jnp.nan, k), jnp.where(tail, jnp.nan, v)
    out = flash_attention(q, k_bad, v_bad, q_offset, kv_len, block_sizes=SMALL, interpret=interpret)
    assert np.isfinite(np.asarray(out)).all()
    pos = q_offset[:, None] + jnp.arange(24)[None, :]  # [B, T]
    assert (np.asarray(out)[np.asarray(pos >= kv_len[:, None])] == 0).all()
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("field,kwargs", [
    ("block_q", dict(block_q=48)),
    ("block_q", dict(block_q=8)),
    ("block_k", dict(block_k=100)),
    ("num_warps", dict(num_warps=3)),
    ("num_stages", dict(num_stages=0)),
])
def test_block_sizes_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**kwargs)


def test_flash_rejects_bad_shapes():
    q = jnp.zeros((1, 8, 6, 64))
    k = jnp.zeros((1, 8, 4, 64))
    with pytest.raises(ValueError, match="not divisible"):
        flash_attention(q, k, k, jnp.zeros(1, jnp.int32), jnp.ones(1, jnp.int32), interpret=True)
