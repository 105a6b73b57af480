"""pallas_kernels.quant_matmul against its float32 ref: Pallas interpret mode on the CPU, and the
same tests compiled on a GPU (`pytest -m gpu`; kernel_checks.MODES), where the batch-1 step runs
its inline PTX (tests/test_quant_ptx.py checks that PTX on the CPU)."""
import dataclasses
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels.quant_matmul import (BlockSizes, pack_int4, quant_matmul, quant_matmul_multi,
                                         quant_matmul_multi_ref, quant_matmul_ref, unpack_int4)
from kernel_checks import GPU, MODES, gpu_marked_needs_gpu  # noqa: F401 (autouse fixture)

INTERPRET = True  # the argument checks run before any kernel: one mode is enough


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
    (1, 512, 200, 4, 64, BlockSizes(fold=True)),  # the folded int4 PTX step (compiled runs)
    (3, 256, 384, 4, 32, BlockSizes(block_n=64)),
    (16, 512, 200, 4, 64, BlockSizes(k_splits=4, prefetch=3)),
    (1, 512, 200, 8, 512, BlockSizes(k_splits=4, fused_reduce=True)),  # in-kernel split sum
    (5, 512, 200, 4, 64, BlockSizes(k_splits=3, fused_reduce=True)),
    (1, 256, 200, 4, 64, BlockSizes(fma=False, prefetch=1)),
    (20, 256, 96, 4, 64, BlockSizes(block_m=16)),
    (1, 300, 130, 16, 0, None),
    (3, 256, 200, 16, 0, None),
    # bf16 at M = 1 through the dot path (x padded to 16 rows, Triton-pipelined tiles)
    (1, 300, 130, 16, 0, BlockSizes(fma=False, prefetch=1, block_n=64, block_k=64, k_splits=2)),
    # mma: int4 as int32 words of 4 columns, a dot of the transposed tile (N % 4 == 0, ragged)
    (1, 512, 200, 4, 64, BlockSizes(mma=True)),
    (1, 256, 96, 4, 32, BlockSizes(mma=True, block_n=64, prefetch=1)),
    (3, 512, 200, 4, 128, BlockSizes(mma=True, k_splits=2)),
    (1, 256, 130, 4, 128, BlockSizes(mma=True)),  # N % 4 != 0: the plain dot path instead
    # int4_words: int4 read as int32 words of 4 columns, a folded PTX step per column (M == 1)
    (1, 512, 200, 4, 64, BlockSizes(words=True)),  # ragged N: masked scales and stores
    (1, 512, 384, 4, 128, BlockSizes(words=True, block_n=64, k_splits=2, prefetch=3)),
    (1, 256, 96, 4, 32, BlockSizes(words=True, k_splits=1)),  # unsplit
    (1, 256, 130, 4, 64, BlockSizes(words=True)),  # N % 4 != 0: the byte path instead
    # a prefill's rows: 128-row tiles (the default past M = 64), ragged M and N, split or not
    (200, 256, 200, 4, 128, None),
    (130, 512, 96, 4, 64, BlockSizes(block_m=128, block_n=64, block_k=64, fma=False, prefetch=1, k_splits=1)),
    (129, 256, 200, 8, 256, None),
    (1, 512, 200, 4, 512, BlockSizes(words=True)),  # per-channel: the byte path instead
    (1, 300, 200, 8, 300, BlockSizes(words=True)),  # int8 words, per channel, ragged N and K
    (1, 512, 384, 8, 512, BlockSizes(words=True, block_n=256, block_k=32, k_splits=4)),
    (1, 512, 200, 8, 64, BlockSizes(words=True)),  # int8 with group scales: the byte path
    # words in sub-tiles: one accumulator per column for the same element of each sub-tile
    (1, 512, 200, 4, 128, BlockSizes(words=True, sub_tiles=4)),
    (1, 512, 384, 4, 64, BlockSizes(words=True, sub_tiles=2, block_n=64, prefetch=3)),
    (1, 300, 200, 8, 300, BlockSizes(words=True, sub_tiles=4)),  # ragged K: masked sub-tiles
    (1, 512, 384, 8, 512, BlockSizes(words=True, sub_tiles=2, block_k=64, k_splits=2)),
    # int4 by integer dot products (bf16/f16 x only): float32 x takes the float word path
    (1, 512, 200, 4, 128, BlockSizes(words=True, idp4a=True)),
]


def _case_id(case) -> str:
    m, k, n, bits, g, bs = case
    return f"M={m}_K={k}_N={n}_int{bits}_g{g}" + ("" if bs is None else "_custom_blocks")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_matches_ref(case, interpret):
    m, k, n, bits, group_size, block_sizes = case
    x, q, scale = _inputs(_case_id(case), m, k, n, bits, group_size, jnp.float32)
    y = quant_matmul(x, q, scale, bits=bits, group_size=group_size, block_sizes=block_sizes,
                     interpret=interpret)
    ref = quant_matmul_ref(x, q, scale, bits=bits, group_size=group_size)
    assert y.shape == (m, n) and y.dtype == x.dtype
    assert not np.isnan(np.asarray(y)).any()
    np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("interpret", MODES)
# At M = 1 a bf16 weight with N even is read as int32 words of 2 columns: N = 198 takes that path
# (ragged in the last block), N = 199 the per-element one.
@pytest.mark.parametrize("m,bits,group_size,n", [
    (1, 8, 256, 200), (1, 16, 0, 198), (1, 16, 0, 199), (3, 4, 64, 200), (3, 16, 0, 200)],
    ids=lambda v: str(v))
def test_kernel_bf16_input_within_bf16_tolerance(m, bits, group_size, n, interpret):
    x, q, scale = _inputs(f"bf16_{m}_{bits}_{n}", m, 256, n, bits, group_size, jnp.bfloat16)
    y = quant_matmul(x, q, scale, bits=bits, group_size=group_size, interpret=interpret)
    ref = quant_matmul_ref(x.astype(jnp.float32), q.astype(jnp.float32) if bits == 16 else q,
                           None if scale is None else scale.astype(jnp.float32), bits=bits,
                           group_size=group_size)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    assert not np.isnan(np.asarray(y, np.float32)).any()
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("dtype,n,block_sizes,norm", [
    (jnp.bfloat16, 200, BlockSizes(words=True, idp4a=True), False),  # ragged N, split
    (jnp.float16, 384, BlockSizes(words=True, idp4a=True, block_n=64, k_splits=1), False),
    (jnp.bfloat16, 256, BlockSizes(words=True, idp4a=True, prefetch=3, k_splits=2), False),
    (jnp.bfloat16, 200, BlockSizes(words=True, idp4a=True), True),  # the norm prologue
    (jnp.float16, 256, BlockSizes(words=True, idp4a=True), True)],
    ids=["bf16-ragged", "f16-unsplit", "bf16-prefetch3", "bf16-norm", "f16-norm"])
def test_idp4a_matches_ref_and_the_float_path(dtype, n, block_sizes, norm, interpret):
    """int4 by integer dot products: x in two int8 limbs per 8 values is ~15 bits of x, so the
    result is the float path's up to the output's rounding, also with an outlier 300x the rest
    of x in the same 8-value set. bf16 x reads x, the scales and the norm weight as int32 pairs."""
    k, g = 512, 128
    x, q, scale = _inputs(f"idp4a_{n}_{norm}", 1, k, n, 4, g, dtype)
    x = x.at[0, 5].set(300.0)  # an outlier in the first set of 8 (rows 5 - 5 % 4 + 4 r)
    kw = dict(bits=4, group_size=g, interpret=interpret)
    if norm:
        kw.update(norm=jax.random.uniform(jax.random.key(3), (k,), jnp.float32, 0.5, 1.5).astype(dtype),
                  eps=1e-5)
    y = quant_matmul(x, q, scale, block_sizes=block_sizes, **kw)
    floats = quant_matmul(x, q, scale, block_sizes=dataclasses.replace(block_sizes, idp4a=False), **kw)
    kw.pop("interpret")
    if norm:  # the model's rounding: x * inv_rms to x's dtype, times the weight in x's dtype
        xf = x.astype(jnp.float32)
        inv = jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + 1e-5)
        x = (xf * inv).astype(dtype) * kw.pop("norm")
        kw.pop("eps")
    ref = np.asarray(quant_matmul_ref(x.astype(jnp.float32), q, scale.astype(jnp.float32), **kw))
    y, floats = np.asarray(y, np.float32), np.asarray(floats, np.float32)
    assert y.shape == (1, n) and y.dtype == np.float32 and np.isfinite(y).all()
    tol = 4e-3 * np.abs(ref).max()  # two roundings to 16 bits of outputs up to |ref|.max()
    np.testing.assert_allclose(y, ref, rtol=1e-2, atol=tol)
    np.testing.assert_allclose(y, floats, rtol=1e-2, atol=tol)


def test_pack_unpack_int4_round_trip():
    codes = jax.random.randint(jax.random.key(0), (256, 24), -8, 8).astype(jnp.int8)
    for group_size in (32, 64, 128):
        packed = pack_int4(codes, group_size)
        assert packed.shape == (128, 24) and packed.dtype == jnp.int8
        np.testing.assert_array_equal(np.asarray(unpack_int4(packed, group_size)),
                                      np.asarray(codes))


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,n,group_size", [(1, 200, 32), (1, 384, 64), (1, 100, 128), (3, 200, 64),
                                            (130, 200, 128)], ids=lambda v: str(v))
def test_mma_bf16_input_matches_ref(m, n, group_size, interpret):
    """mma with bf16 x, the arithmetic it is built for (bf16 codes, float32 accumulation): only
    the order of the float32 sums and the final rounding to bf16 differ from the ref. M = 130:
    a prefill's rows in 128-row tiles, the last one ragged."""
    x, q, scale = _inputs(f"mma_bf16_{m}_{n}_{group_size}", m, 512, n, 4, group_size, jnp.bfloat16)
    y = quant_matmul(x, q, scale, bits=4, group_size=group_size, interpret=interpret,
                     block_sizes=BlockSizes(mma=True, block_n=64, prefetch=1, block_m=128 if m > 64 else 16))
    ref = quant_matmul_ref(x.astype(jnp.float32), q, scale.astype(jnp.float32), bits=4,
                           group_size=group_size)
    assert y.shape == (m, n) and y.dtype == jnp.bfloat16
    y, ref = np.asarray(y, np.float32), np.asarray(ref)
    assert not np.isnan(y).any()
    # one bf16 rounding of y (2**-8 relative), far below one code's weight (|x| scale ~ 0.1)
    np.testing.assert_allclose(y, ref, rtol=2**-7, atol=1e-3)


@pytest.mark.parametrize("field,value", [("block_n", 96), ("block_k", 8), ("block_m", 256),
                                         ("k_splits", 0), ("num_warps", 3), ("num_stages", 0),
                                         ("prefetch", 5), ("sub_tiles", 3)])
def test_block_sizes_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        BlockSizes(**{field: value})
    if field == "block_k":
        with pytest.raises(ValueError, match="block_k.*mma"):
            BlockSizes(block_k=16, mma=True)


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


# quant_matmul_multi: (M, K, N_i per weight, bits, group_size, block_sizes). Default blocks are 256
# (int8) or 128 (int4) wide at M = 1 and 128 at M > 1, so most N_i end in a partial block; K = 256
# at M > 1 runs unsplit (outputs written directly) unless k_splits says otherwise.
MULTI_CASES = [
    (1, 256, (200, 72), 8, 256, None),  # per-channel int8, split, ragged
    (3, 256, (128, 200, 40), 8, 64, BlockSizes(k_splits=2)),  # grouped int8, dot path, split
    (16, 256, (130, 96), 4, 64, None),  # int4, dot path, unsplit
    (1, 256, (384, 100, 100), 4, 32, None),  # int4, a wide q and two narrow k/v, split
    (1, 300, (130, 40), 16, 0, BlockSizes(k_splits=3, fused_reduce=True)),  # bf16, in-kernel sum
    (1, 256, (200, 72, 64), 4, 64, BlockSizes(mma=True)),  # int4 mma, q/k/v-like, split
    (1, 256, (384, 100), 4, 32, BlockSizes(mma=True, block_n=64, k_splits=1)),  # mma, unsplit
]


def _multi_id(case) -> str:
    m, k, ns, bits, g, bs = case
    return (f"M={m}_K={k}_N={'+'.join(map(str, ns))}_int{bits}_g{g}"
            + ("" if bs is None else "_custom_blocks"))


def _multi_inputs(case_id: str, m, k, ns, bits, group_size):
    """x [M, K] and one (q, scale) per N_i, each weight seeded apart."""
    x = _inputs(case_id, m, k, 1, bits, group_size, jnp.float32)[0]
    return x, [_inputs(f"{case_id}_w{i}", m, k, n, bits, group_size, jnp.float32)[1:]
               for i, n in enumerate(ns)]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", MULTI_CASES, ids=_multi_id)
def test_multi_kernel_matches_ref(case, interpret):
    m, k, ns, bits, group_size, block_sizes = case
    x, weights = _multi_inputs(_multi_id(case), m, k, ns, bits, group_size)
    ys = quant_matmul_multi(x, weights, bits=bits, group_size=group_size,
                            block_sizes=block_sizes, interpret=interpret)
    refs = quant_matmul_multi_ref(x, weights, bits=bits, group_size=group_size)
    assert isinstance(ys, tuple) and len(ys) == len(refs) == len(ns)
    for i, (y, ref, n) in enumerate(zip(ys, refs, ns)):
        assert y.shape == (m, n) and y.dtype == x.dtype, i
        assert not np.isnan(np.asarray(y)).any(), f"weight {i}: unwritten output"
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4,
                                   err_msg=f"weight {i}")


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("m,bits,group_size", [(1, 8, 256), (3, 4, 64)],
                         ids=["M=1_K=256_N=200_int8_split", "M=3_K=256_N=200_int4_g64"])
def test_multi_of_one_weight_equals_quant_matmul(m, bits, group_size, interpret):
    x, q, scale = _inputs(f"one_{m}_{bits}", m, 256, 200, bits, group_size, jnp.float32)
    (y,) = quant_matmul_multi(x, [(q, scale)], bits=bits, group_size=group_size,
                              interpret=interpret)
    want = quant_matmul(x, q, scale, bits=bits, group_size=group_size, interpret=interpret)
    assert not np.isnan(np.asarray(y)).any()
    np.testing.assert_array_equal(np.asarray(y), np.asarray(want))


def test_multi_bad_weights_raise_naming_the_weight():
    x, q, scale = _inputs("multi_bad", 2, 256, 64, 8, 256, jnp.float32)
    kw = dict(bits=8, group_size=256, interpret=INTERPRET)
    with pytest.raises(ValueError, match=r"weights\[1\] \(q \(128, 64\).*q.shape"):  # K differs
        quant_matmul_multi(x, [(q, scale), (q[:128], scale)], **kw)
    q4 = pack_int4(jnp.clip(q, -8, 7), 256)  # an int4 weight among int8 ones
    with pytest.raises(ValueError, match=r"weights\[2\] \(q \(128, 64\)"):
        quant_matmul_multi(x, [(q, scale), (q, scale), (q4, scale)], **kw)
    with pytest.raises(ValueError, match=r"weights\[1\] .*bfloat16.*dtypes differ"):
        quant_matmul_multi(x, [(q, scale), (q, scale.astype(jnp.bfloat16))], **kw)
    with pytest.raises(ValueError, match=r"weights\[1\] .*scale \(1, 32\)"):
        quant_matmul_multi(x, [(q, scale), (q, scale[:, :32])], **kw)
    with pytest.raises(ValueError, match="non-empty"):
        quant_matmul_multi(x, [], **kw)
    w16 = jnp.zeros((256, 64), jnp.float32)
    with pytest.raises(ValueError, match=r"weights\[1\] .*dtypes differ"):
        quant_matmul_multi(x, [(w16, None), (w16.astype(jnp.bfloat16), None)], bits=16,
                           group_size=0, interpret=INTERPRET)


# RMSNorm in the prologue: (M, K, N_i per weight, bits, group_size, block_sizes). K = 300 leaves a
# partial chunk of the sum of squares; M = 3 and 16 take the dot path.
NORM_CASES = [
    (1, 512, (200, 72), 8, 512, None),  # per-channel int8 GEMV, split
    (1, 512, (256, 64, 64), 4, 64, None),  # int4 q/k/v, the folded step
    (3, 256, (130,), 4, 64, BlockSizes(k_splits=2)),  # int4 dot path, split
    (16, 512, (200, 96), 8, 64, BlockSizes(k_splits=4, prefetch=3)),
    (1, 300, (130, 40), 16, 0, None),  # bf16 GEMV, ragged K
    (1, 300, (130, 40), 16, 0, BlockSizes(fma=False, prefetch=1, block_n=64, block_k=64)),  # dot path
    (3, 256, (200,), 16, 0, None),
    (1, 512, (256, 64, 64), 4, 64, BlockSizes(mma=True)),  # int4 mma q/k/v, split
    (1, 256, (200,), 4, 128, BlockSizes(mma=True, k_splits=1)),  # int4 mma, unsplit
    (1, 512, (256, 64, 64), 4, 64, BlockSizes(words=True)),  # int4 words q/k/v, split
    (1, 512, (256, 64, 64), 8, 512, BlockSizes(words=True)),  # int8 words q/k/v, split
    (1, 512, (256, 64, 64), 4, 128, BlockSizes(words=True, sub_tiles=4)),  # and sub-tiles
]


@pytest.mark.parametrize("interpret", MODES)
@pytest.mark.parametrize("case", NORM_CASES, ids=_multi_id)
def test_norm_prologue_matches_ref(case, interpret):
    """norm=w: RMSNorm(x) @ each weight; x far from unit RMS, so a norm left out or applied twice
    fails."""
    m, k, ns, bits, group_size, block_sizes = case
    case_id = "norm_" + _multi_id(case)
    x, weights = _multi_inputs(case_id, m, k, ns, bits, group_size)
    x = 3.0 * x + 1.0
    norm = jax.random.uniform(jax.random.key(zlib.crc32(case_id.encode())), (k,), jnp.float32, 0.5, 1.5)
    kw = dict(bits=bits, group_size=group_size, norm=norm, eps=1e-5)
    if len(ns) == 1:
        ys = (quant_matmul(x, *weights[0], block_sizes=block_sizes, interpret=interpret, **kw),)
    else:
        ys = quant_matmul_multi(x, weights, block_sizes=block_sizes, interpret=interpret, **kw)
    refs = quant_matmul_multi_ref(x, weights, **kw)
    plain = quant_matmul_multi_ref(x, weights, bits=bits, group_size=group_size)
    for i, (y, ref, raw) in enumerate(zip(ys, refs, plain)):
        assert not np.isnan(np.asarray(y)).any(), f"weight {i}: unwritten output"
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4, err_msg=f"weight {i}")
        assert not np.allclose(np.asarray(ref), np.asarray(raw), rtol=1e-2, atol=1e-2)  # the norm matters


def test_norm_of_the_wrong_shape_or_dtype_raises():
    x, q, scale = _inputs("norm_bad", 1, 256, 64, 8, 256, jnp.float32)
    with pytest.raises(ValueError, match=r"norm must be \[256\] float32.*\(128,\)"):
        quant_matmul(x, q, scale, bits=8, group_size=256, norm=jnp.ones((128,)), interpret=INTERPRET)
    with pytest.raises(ValueError, match="norm must be.*bfloat16"):
        quant_matmul_multi(x, [(q, scale)], bits=8, group_size=256, norm=jnp.ones((256,), jnp.bfloat16),
                           interpret=INTERPRET)


# Compiled only (too large for interpret mode): bf16 x, default tiles, ragged and irregular shapes
# at Llama sizes, one weight per call and several. (M, K, N_i per weight, bits, group_size, blocks)
LARGE_CASES = [
    (1, 4096 + 64, (4096 + 48,), 8, 4096 + 64, None), (3, 1000, (300,), 8, 1000, None),
    (5, 4096, (4128,), 4, 128, None), (16, 4096, (4096,), 4, 32, None), (64, 2048, (1000,), 4, 64, None),
    (1, 4096, (4096,), 4, 64, None), (1, 300, (200,), 16, 0, None), (8, 4096, (4096,), 16, 0, None),
    (2, 4096, (4096,), 8, 128, None),
    (1, 4096, (4096, 4096, 4096), 8, 4096, None),  # q/k/v
    (8, 8192, (4096, 512, 512), 4, 128, None),  # GQA q/k/v per TP2 shard
    (1, 4096, (11008, 11008), 4, 128, None),  # gate/up
    (3, 1000, (300, 130, 48), 8, 1000, None),
    (1, 4096, (4096, 1000), 8, 4096, BlockSizes(block_n=256, block_k=32, fused_reduce=True)),
    (1, 4096, (11008, 11008), 4, 128, BlockSizes(block_n=128, block_k=128, prefetch=2, fold=True)),
    # bf16 words with the in-kernel split sum: its strided partial loads and stores
    (1, 4096, (4096, 1000), 16, 0, BlockSizes(block_n=256, block_k=32, fused_reduce=True)),
    # int4 mma (inline PTX codes, wgmma on Hopper): gate/up, q/k/v with GQA, ragged N, g32, M > 1
    (1, 4096, (11008, 11008), 4, 128, BlockSizes(block_n=128, block_k=128, prefetch=1,
                                                 num_stages=1, mma=True)),
    (1, 4096, (4096, 1000, 1000), 4, 128, BlockSizes(block_n=256, block_k=128, prefetch=1,
                                                     num_stages=1, num_warps=8, mma=True)),
    (1, 11008, (4096,), 4, 32, BlockSizes(block_n=128, block_k=128, prefetch=2, mma=True)),
    (8, 4096, (4096, 512, 512), 4, 128, BlockSizes(prefetch=1, num_stages=3, mma=True)),
    # bf16 through the dot path at M = 1 and 8: q/k/v, gate/up, ragged N and K
    (1, 4096, (4096, 4096, 4096), 16, 0, BlockSizes(fma=False, prefetch=1, num_stages=4, tf32_dot=False)),
    (1, 4096, (11008, 11008), 16, 0, BlockSizes(block_n=64, block_k=128, fma=False, prefetch=1,
                                                num_stages=4, tf32_dot=False, target_programs=396)),
    (1, 11008 + 64, (4096 + 48,), 16, 0, BlockSizes(block_n=128, block_k=256, fma=False, prefetch=1,
                                                    num_stages=3, num_warps=8, tf32_dot=False)),
    (8, 4096, (4096, 4096), 16, 0, BlockSizes(fma=False, prefetch=1, num_stages=4, tf32_dot=False)),
]


@GPU
@pytest.mark.parametrize("case", LARGE_CASES, ids=_multi_id)
def test_large_shapes_match_ref(case):
    """Relative L2 error of the bf16 output under 1e-2 (the ref rounds to bf16 too)."""
    m, k, ns, bits, group_size, block_sizes = case
    case_id = _multi_id(case)
    x = _inputs(case_id, m, k, 1, bits, group_size, jnp.bfloat16)[0]
    weights = [_inputs(f"{case_id}_w{i}", m, k, n, bits, group_size, jnp.bfloat16)[1:] for i, n in enumerate(ns)]
    if len(ns) == 1:
        ys = (quant_matmul(x, *weights[0], bits=bits, group_size=group_size, block_sizes=block_sizes),)
    else:
        ys = quant_matmul_multi(x, weights, bits=bits, group_size=group_size, block_sizes=block_sizes)
    refs = quant_matmul_multi_ref(x, weights, bits=bits, group_size=group_size)
    for i, (y, ref) in enumerate(zip(ys, refs)):
        y, ref = np.asarray(y, np.float32), np.asarray(ref, np.float32)
        assert not np.isnan(y).any(), f"weight {i}: unwritten output"
        rel = np.linalg.norm(y - ref) / np.linalg.norm(ref)
        assert rel < 1e-2, f"weight {i}: {rel=}"
