"""decode_attention against decode_attention_ref on CPU (Pallas interpret mode).

Interpret mode fills pallas outputs with NaN and pads out-of-bounds reads with NaN, so "no NaN
where the reference is finite" proves every output element was written and no unmasked read
crossed the end of the cache.
"""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.decode_attention import BlockSizes, decode_attention, decode_attention_ref
from kernel_checks import assert_close

# Relative L2 error and max abs error bounds per dtype (float32: reordering only; bf16: the
# probabilities are rounded before the PV dot and the output is rounded).

# (B, S, H, G, K, dtype, lengths, num_splits); block_k = 16 throughout.
CASES = [
    (1, 40, 2, 2, 64, jnp.float32, [40], None),
    (3, 100, 8, 2, 64, jnp.bfloat16, [100, 1, 32], None),  # GQA 4; full, 1, block boundary
    (3, 100, 8, 1, 128, jnp.float32, [1, 33, 100], 3),  # GQA 8
    (3, 300, 4, 4, 128, jnp.bfloat16, [300, 16, 1], 4),
    (1, 300, 16, 2, 128, jnp.float32, [257], 1),  # one split: the kernel normalises itself
    (3, 64, 8, 8, 64, jnp.float32, [64, 63, 17], 16),  # more splits than a short row has blocks
]


def _case_id(case) -> str:
    B, S, H, G, K, dtype, _, num_splits = case
    return f"{B=}_{S=}_{H=}_{G=}_{K=}_{jnp.dtype(dtype).name}_splits={num_splits}"


def _inputs(case, case_id: str):
    B, S, H, G, K, dtype, lengths, _ = case
    kq, kk, kv = jax.random.split(jax.random.key(zlib.crc32(case_id.encode())), 3)
    q = jax.random.normal(kq, (B, H, K), jnp.float32).astype(dtype)  # [B, H, K]
    k = jax.random.normal(kk, (B, S, G, K), jnp.float32).astype(dtype)  # [B, S, G, K]
    v = jax.random.normal(kv, (B, S, G, K), jnp.float32).astype(dtype)  # [B, S, G, K]
    return q, k, v, jnp.array(lengths, jnp.int32)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_decode_matches_ref(case):
    q, k, v, lengths = _inputs(case, _case_id(case))
    block_sizes = BlockSizes(block_k=16, num_splits=case[7], num_warps=4, num_stages=2)
    out = decode_attention(q, k, v, lengths, block_sizes=block_sizes, interpret=True)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, decode_attention_ref(q, k, v, lengths), case[5])


def test_decode_default_blocks_matches_ref():
    case = (2, 200, 8, 2, 128, jnp.float32, [200, 65], None)
    q, k, v, lengths = _inputs(case, "default_blocks")
    assert_close(decode_attention(q, k, v, lengths, interpret=True), decode_attention_ref(q, k, v, lengths),
                  jnp.float32)


def test_decode_never_reads_past_length():
    """NaN in the cache past each row's length must not reach the output."""
    case = (3, 80, 8, 2, 64, jnp.float32, [80, 1, 33], 2)
    q, k, v, lengths = _inputs(case, "nan_tail")
    ref = decode_attention_ref(q, k, v, lengths)
    tail = (jnp.arange(80)[None, :] >= lengths[:, None])[:, :, None, None]  # [B, S, 1, 1]
    k_bad, v_bad = jnp.where(tail, jnp.nan, k), jnp.where(tail, jnp.nan, v)
    block_sizes = BlockSizes(block_k=16, num_splits=2)
    out = decode_attention(q, k_bad, v_bad, lengths, block_sizes=block_sizes, interpret=True)
    assert np.isfinite(np.asarray(out)).all()
    assert_close(out, ref, jnp.float32)


@pytest.mark.parametrize("field,kwargs", [
    ("block_k", dict(block_k=8)),
    ("block_k", dict(block_k=96)),
    ("num_splits", dict(num_splits=0)),
    ("num_warps", dict(num_warps=6)),
    ("num_stages", dict(num_stages=0)),
])
def test_block_sizes_validation_names_the_field(field, kwargs):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**kwargs)
