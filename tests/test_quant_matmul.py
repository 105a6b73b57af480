"""pallas_kernels.quant_matmul: the Pallas kernel (interpret mode on CPU) against its f32 ref."""
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import (BlockSizes, pack_int4, quant_matmul, quant_matmul_ref,
                                         unpack_int4)

INTERPRET = True


def _inputs(case: str, m: int, k: int, n: int, bits: int, group_size: int, x_dtype):
    """Fresh random x, codes over the full range, and scales, seeded by the case id."""
    kx, kq, ks = jax.random.split(jax.random.key(zlib.crc32(case.encode())), 3)
    x = jax.random.normal(kx, (m, k), jnp.float32).astype(x_dtype)  # [M, K]
    if bits == 16:
        return x, jax.random.normal(kq, (k, n), x_dtype), None
    lim = 8 if bits == 4 else 128
    q = jax.random.randint(kq, (k, n), -lim + 1, lim, jnp.int8)  # [K, N]
    if bits == 4:
        q = pack_int4(q, group_size)  # [K/2, N]
    scale = jax.random.uniform(ks, (k // group_size, n), jnp.float32, 0.5, 1.5) / lim
    return x, q, scale.astype(x_dtype)


# (M, K, N, bits, group_size, block_sizes): N and per-channel K are often not block multiples.
CASES = [
    (1, 256, 200, 8, 256, None),
    (3, 300, 130, 8, 300, None),
    (16, 512, 384, 8, 512, None),
    (1, 300, 96, 8, 300, BlockSizes(block_k=64, k_splits=3)),
    (3, 512, 200, 8, 64, BlockSizes(prefetch=2, tf32_dot=True)),
    (1, 512, 384, 4, 128, None),
    (3, 256, 200, 4, 128, None),
    (16, 256, 130, 4, 128, None),
    (1, 512, 100, 4, 32, BlockSizes(prefetch=4)),
    (3, 256, 384, 4, 32, BlockSizes(block_n=64)),
    (16, 512, 200, 4, 64, BlockSizes(k_splits=4, prefetch=3)),
    (1, 512, 200, 8, 512, BlockSizes(k_splits=4, fused_reduce=True)),  # in-kernel split sum
    (5, 512, 200, 4, 64, BlockSizes(k_splits=3, fused_reduce=True)),
    (1, 256, 200, 4, 64, BlockSizes(fma=False, prefetch=1)),
    (20, 256, 96, 4, 64, BlockSizes(block_m=16)),
    (1, 300, 130, 16, 0, None),
    (3, 256, 200, 16, 0, None),
]


def _case_id(case) -> str:
    m, k, n, bits, g, bs = case
    return f"M={m}_K={k}_N={n}_int{bits}_g{g}" + ("" if bs is None else "_custom_blocks")


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_ref(case):
    m, k, n, bits, group_size, block_sizes = case
    x, q, scale = _inputs(_case_id(case), m, k, n, bits, group_size, jnp.float32)
    y = quant_matmul(x, q, scale, bits=bits, group_size=group_size, block_sizes=block_sizes,
                     interpret=INTERPRET)
    ref = quant_matmul_ref(x, q, scale, bits=bits, group_size=group_size)
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert not np.isnan(np.asarray(y)).any()
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,bits,group_size", [(1, 8, 256), (3, 4, 64)],
                         ids=["M=1_K=256_N=200_int8", "M=3_K=256_N=200_int4_g64"])
def test_kernel_bf16_input_within_bf16_tolerance(m, bits, group_size):
    x, q, scale = _inputs(f"bf16_{m}_{bits}", m, 256, 200, bits, group_size, jnp.bfloat16)
    y = quant_matmul(x, q, scale, bits=bits, group_size=group_size, interpret=INTERPRET)
    ref = quant_matmul_ref(x.astype(jnp.float32), q, scale.astype(jnp.float32), bits=bits,
                           group_size=group_size)
    assert y.dtype == jnp.bfloat16 and not np.isnan(np.asarray(y, np.float32)).any()
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_pack_unpack_int4_round_trip():
    codes = jax.random.randint(jax.random.key(0), (256, 24), -8, 8).astype(jnp.int8)
    for group_size in (32, 64, 128):
        packed = pack_int4(codes, group_size)
        assert packed.shape == (128, 24) and packed.dtype == jnp.int8
        np.testing.assert_array_equal(np.asarray(unpack_int4(packed, group_size)),
                                      np.asarray(codes))


@pytest.mark.parametrize("field,value", [("block_n", 96), ("block_k", 8), ("block_m", 128),
                                         ("k_splits", 0), ("num_warps", 3), ("num_stages", 0),
                                         ("prefetch", 5)])
def test_block_sizes_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**{field: value})


def test_bad_arguments_raise():
    x, q, scale = _inputs("bad", 2, 256, 64, 8, 256, jnp.float32)
    with pytest.raises(ValueError, match="bits"):
        quant_matmul(x, q, scale, bits=5, group_size=256, interpret=INTERPRET)
    with pytest.raises(ValueError, match="scale"):
        quant_matmul(x, q, scale[:, :32], bits=8, group_size=256, interpret=INTERPRET)
    with pytest.raises(ValueError, match="group_size"):
        quant_matmul(x, q, scale, bits=8, group_size=100, interpret=INTERPRET)
    with pytest.raises(ValueError, match="q.shape"):
        quant_matmul(x[:, :128], q, scale, bits=8, group_size=128, interpret=INTERPRET)
