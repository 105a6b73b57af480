"""jllm.quant: quantizer error bounds, layouts, QArray as a pytree, and `linear` (CPU)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jllm.plan import Plan
from jllm.quant import QArray, dequantize, linear, linears, quantize, rms_norm
from pallas_kernels.quant_matmul import pack_int4


def _weight(seed: int, shape: tuple[int, int], dtype=jnp.bfloat16) -> jax.Array:
    w = jax.random.normal(jax.random.key(seed), shape, jnp.float32) * 0.02
    return w.astype(dtype)


def _elementwise_bound(qa: QArray) -> np.ndarray:
    """scale / 2 for every element of the logical [in, out] weight."""
    scale = np.asarray(qa.scale.astype(jnp.float32))  # [in/G, out]
    return np.repeat(scale, qa.group_size, axis=0) / 2  # [in, out]


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32], ids=lambda d: jnp.dtype(d).name)
def test_int8_per_channel_error_within_half_scale(dtype):
    w = _weight(0, (256, 96), dtype)  # [in, out]
    qa, err = quantize(w)
    assert qa.q.dtype == jnp.int8 and qa.q.shape == (256, 96)
    assert qa.scale.shape == (1, 96) and qa.dtype == dtype
    assert (qa.bits, qa.group_size, qa.shape) == (8, 256, (256, 96))
    diff = np.abs(np.asarray(dequantize(qa, jnp.float32)) - np.asarray(w.astype(jnp.float32)))
    assert np.all(diff <= _elementwise_bound(qa) * (1 + 1e-6))
    assert float(err) == pytest.approx(diff.max(), rel=1e-6)


@pytest.mark.parametrize("group_size", [32, 64, 128])
def test_int4_per_group_error_within_half_scale(group_size):
    w = _weight(1, (256, 80))
    qa, err = quantize(w, bits=4, group_size=group_size)
    assert qa.q.dtype == jnp.int8 and qa.q.shape == (128, 80)
    assert qa.scale.shape == (256 // group_size, 80)
    assert (qa.bits, qa.group_size, qa.shape) == (4, group_size, (256, 80))
    diff = np.abs(np.asarray(dequantize(qa, jnp.float32)) - np.asarray(w.astype(jnp.float32)))
    assert np.all(diff <= _elementwise_bound(qa) * (1 + 1e-6))
    assert float(err) == pytest.approx(diff.max(), rel=1e-6)


def test_int8_explicit_group_size_gives_per_group_scales():
    w = _weight(3, (128, 48))
    qa, err = quantize(w, bits=8, group_size=32)
    assert qa.scale.shape == (4, 48) and qa.q.shape == (128, 48)
    diff = np.abs(np.asarray(dequantize(qa, jnp.float32)) - np.asarray(w.astype(jnp.float32)))
    assert np.all(diff <= _elementwise_bound(qa) * (1 + 1e-6))


def test_int4_layout_low_nibble_first_half_of_group():
    group, k, n = 32, 64, 3
    codes = jax.random.randint(jax.random.key(4), (k, n), -8, 8).astype(jnp.int8)  # [in, out]
    packed = np.asarray(pack_int4(codes, group)).view(np.uint8)  # [in/2, out]
    c = np.asarray(codes).view(np.uint8) & 0xF
    for g in range(k // group):
        for j in range(group // 2):
            row = g * group // 2 + j
            np.testing.assert_array_equal(packed[row] & 0xF, c[g * group + j])
            np.testing.assert_array_equal(packed[row] >> 4, c[g * group + group // 2 + j])


def test_zero_weight_quantizes_exactly():
    qa, err = quantize(jnp.zeros((64, 16), jnp.bfloat16), bits=4, group_size=32)
    assert float(err) == 0.0
    assert not np.any(np.asarray(dequantize(qa)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32],
                         ids=lambda d: jnp.dtype(d).name)
def test_dequantize_round_trip_shape_and_dtype(dtype):
    w = _weight(5, (128, 40), dtype)
    for bits in (8, 4):
        qa, _ = quantize(w, bits=bits, group_size=None if bits == 8 else 64)
        out = dequantize(qa, dtype)
        assert out.shape == w.shape == qa.shape and out.dtype == dtype


@pytest.mark.parametrize("shape,bits,group_size", [
    ((100, 16), 4, 64), ((96, 16), 4, 128), ((100, 16), 8, 64), ((64, 16), 4, 48),
])
def test_quantize_rejects_in_not_multiple_of_group(shape, bits, group_size):
    with pytest.raises(ValueError, match="group_size"):
        quantize(jnp.ones(shape, jnp.bfloat16), bits=bits, group_size=group_size)


def test_quantize_rejects_bad_bits_and_shapes():
    with pytest.raises(ValueError, match="bits"):
        quantize(jnp.ones((64, 8)), bits=3)
    with pytest.raises(ValueError, match="2-D"):
        quantize(jnp.ones((64,)))
    with pytest.raises(ValueError, match="2-D"):
        quantize(jnp.ones((64, 8), jnp.int32))


@pytest.mark.parametrize("bits, group_size", [(4, 64.0), (8, 64.0), (8, True), (8, "64")],
                         ids=["int4_64.0", "int8_64.0", "int8_True", "int8_str"])
def test_group_size_that_is_not_an_int_is_a_value_error(bits, group_size):
    """64.0 == 64 passed the range checks, then failed deep in a reshape; True was a group of 1."""
    from jllm.quant import check_mode
    with pytest.raises(ValueError, match=f"group_size={group_size!r} must be an int"):
        quantize(jnp.ones((128, 8), jnp.float32), bits=bits, group_size=group_size)
    with pytest.raises(ValueError, match=f"group_size={group_size!r} applies to int4 only and must be an int"):
        check_mode("int4", group_size)
    qa, _ = quantize(jnp.ones((128, 8), jnp.float32), bits=4, group_size=np.int64(64))  # a numpy int is fine
    assert qa.group_size == 64


def test_qarray_survives_flatten_unflatten_and_jit():
    qa, _ = quantize(_weight(6, (128, 32)), bits=4, group_size=32)
    leaves, treedef = jax.tree_util.tree_flatten(qa)
    assert len(leaves) == 2  # q and scale; bits and group_size are static
    back = jax.tree_util.tree_unflatten(treedef, leaves)
    assert isinstance(back, QArray) and (back.bits, back.group_size) == (4, 32)
    through = jax.jit(lambda a: jax.tree_util.tree_map(lambda x: x, a))(qa)
    assert isinstance(through, QArray) and (through.bits, through.group_size) == (4, 32)
    np.testing.assert_array_equal(np.asarray(through.q), np.asarray(qa.q))
    np.testing.assert_array_equal(np.asarray(dequantize(through)), np.asarray(dequantize(qa)))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
@pytest.mark.parametrize("bits,group_size", [(None, None), (8, None), (4, 128), (4, 32)],
                         ids=["dense", "int8", "int4_g128", "int4_g32"])
@pytest.mark.parametrize("batch,seq", [(2, 3), (3, 25)], ids=["B=2_T=3", "B=3_T=25"])
def test_linear_matches_dequantized_matmul_under_jit(impl, bits, group_size, batch, seq):
    k, n = 256, 96
    w = _weight(7, (k, n))
    x = jax.random.normal(jax.random.key(batch * 100 + seq), (batch, seq, k), jnp.bfloat16)
    weight = w if bits is None else quantize(w, bits=bits, group_size=group_size)[0]
    dense = w if bits is None else dequantize(weight, jnp.float32)
    y = jax.jit(linear, static_argnames="plan")(x, weight, plan=Plan(matmul_impl=impl))  # [B, T, out]
    ref = jnp.einsum("btk,kn->btn", x.astype(jnp.float32), dense.astype(jnp.float32),
                     precision=jax.lax.Precision.HIGHEST)
    assert y.shape == (batch, seq, n) and y.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)


def test_linear_output_dtype_follows_x():
    qa, _ = quantize(_weight(8, (64, 16)))
    x = jnp.ones((2, 64), jnp.float32)
    assert linear(x, qa).dtype == jnp.float32
    assert linear(x.astype(jnp.bfloat16), qa, Plan(matmul_impl="pallas")).dtype == jnp.bfloat16


def test_linear_rejects_bad_impl_and_shape():
    qa, _ = quantize(_weight(9, (64, 16)))
    with pytest.raises(ValueError, match="impl"):
        linear(jnp.ones((1, 64)), qa, Plan(matmul_impl="cuda"))
    with pytest.raises(ValueError, match="shape"):
        linear(jnp.ones((1, 32)), qa)


@pytest.mark.parametrize("bits,group_size,m,kernel", [
    (4, 128, 64, True), (4, 128, 65, False), (8, None, 1, True), (8, None, 2, False),
    (8, 64, 8, True), (None, None, 1, False),
], ids=["int4_M=64", "int4_M=65", "int8_per_channel_M=1", "int8_per_channel_M=2",
        "int8_g64_M=8", "dense_M=1"])
def test_linear_pallas_routes_small_batches_to_the_kernel(bits, group_size, m, kernel):
    w = _weight(10, (128, 32))
    weight = w if bits is None else quantize(w, bits=bits, group_size=group_size)[0]
    jaxpr = jax.make_jaxpr(lambda x, w: linear(x, w, Plan(matmul_impl="pallas")))(
        jnp.ones((m, 128), jnp.bfloat16), weight)
    assert ("pallas_call" in str(jaxpr)) == kernel


@pytest.mark.parametrize("bits,group_size,m", [(8, None, 1), (4, 32, 3)], ids=["int8_M=1", "int4_M=3"])
def test_linears_fused_is_one_launch_with_the_per_weight_results(bits, group_size, m):
    """q, k, v of a GQA layer (unequal widths) through "pallas-fused": one pallas_call, the same
    outputs as one kernel per weight."""
    ws = [quantize(_weight(20 + i, (128, n)), bits=bits, group_size=group_size)[0]
          for i, n in enumerate((128, 32, 32))]
    x = jax.random.normal(jax.random.key(m), (m, 1, 128), jnp.bfloat16)            # [B, T, D]
    fused = jax.jit(linears, static_argnames="plan")(x, ws, plan=Plan(matmul_impl="pallas-fused"))
    single = jax.jit(linears, static_argnames="plan")(x, ws, plan=Plan(matmul_impl="pallas"))
    assert [y.shape for y in fused] == [(m, 1, 128), (m, 1, 32), (m, 1, 32)]
    for a, b in zip(fused, single):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2, atol=1e-2)
    calls = lambda impl: str(jax.make_jaxpr(lambda x, ws: linears(x, ws, Plan(matmul_impl=impl)))(x, ws)).count("pallas_call")
    assert calls("pallas-fused") == 1 and calls("pallas") >= 2  # (wk and wv share one jaxpr)


def test_linears_fused_falls_back_per_weight_for_mixed_layouts():
    int8 = quantize(_weight(30, (128, 64)))[0]
    int4 = quantize(_weight(31, (128, 64)), bits=4, group_size=32)[0]
    dense = _weight(32, (128, 64)).astype(jnp.bfloat16)
    x = jnp.ones((1, 128), jnp.bfloat16)
    ys = linears(x, [int8, int4, dense], Plan(matmul_impl="pallas-fused"))
    for y, w in zip(ys, (int8, int4, dense)):
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(linear(x, w, Plan(matmul_impl="pallas")), np.float32),
                                   rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="impl"):
        linears(x, [int8], Plan(matmul_impl="fused"))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_linears_fused_runs_float_weights_through_one_gemv_at_batch_1(dtype):
    ws = [_weight(40 + i, (128, n)).astype(dtype) for i, n in enumerate((128, 32, 32))]
    x1 = jax.random.normal(jax.random.key(1), (1, 1, 128), dtype)                  # [B, T, D]
    fused = linears(x1, ws, Plan(matmul_impl="pallas-fused"))
    for y, w in zip(fused, ws):
        ref = jnp.matmul(x1.astype(jnp.float32), w.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(ref), rtol=2e-2, atol=2e-2)
    calls = lambda x: str(jax.make_jaxpr(lambda x, ws: linears(x, ws, Plan(matmul_impl="pallas-fused")))(x, ws)).count("pallas_call")
    assert calls(x1) == 1
    assert calls(jnp.ones((3, 1, 128), dtype)) == 0  # M > 1: XLA's dots


def test_float_weight_knobs_route_single_weights_and_larger_batches(monkeypatch):
    """quant.PALLAS_FLOAT_SINGLE sends a lone float weight (o, down) through the kernel under
    "pallas-fused", and MAX_PALLAS_M_FLOAT raises the rows that take it; results stay the matmul's,
    and the other impls never take the kernel."""
    from jllm import quant
    w = _weight(50, (128, 96)).astype(jnp.float32)
    pair = [w, _weight(51, (128, 32)).astype(jnp.float32)]
    calls = lambda x, ws, impl="pallas-fused": str(jax.make_jaxpr(  # noqa: E731
        lambda x, ws: linears(x, ws, Plan(matmul_impl=impl)))(x, ws)).count("pallas_call")
    x1, x4 = (jax.random.normal(jax.random.key(2), (m, 128), jnp.float32) for m in (1, 4))
    assert calls(x1, [w]) == 0 and calls(x4, pair) == 0  # the defaults: XLA
    monkeypatch.setattr(quant, "PALLAS_FLOAT_SINGLE", True)
    monkeypatch.setattr(quant, "MAX_PALLAS_M_FLOAT", 4)
    assert calls(x1, [w]) == 1 and calls(x4, [w]) == 1 and calls(x4, pair) == 1
    assert calls(jnp.ones((5, 128)), [w]) == 0 and calls(x1, [w], "xla") == 0 and calls(x1, [w], "pallas") == 0
    for x in (x1, x4):
        (y,) = linears(x, [w], Plan(matmul_impl="pallas-fused"))
        ref = jnp.matmul(x, w, precision=jax.lax.Precision.HIGHEST)
        np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["bf16", "int8", "int4"])
def test_linears_with_norm_equal_the_norm_then_linears(kind):
    """norm=w: "pallas-fused" at batch 1 normalizes x inside its one launch; the other impls and
    batch sizes apply rms_norm first. All agree with rms_norm followed by linears."""
    dense = [_weight(50 + i, (128, n)) for i, n in enumerate((128, 32, 32))]
    ws = ([w.astype(jnp.bfloat16) for w in dense] if kind == "bf16" else
          [quantize(w, bits=int(kind[3:]), group_size=32 if kind == "int4" else None)[0] for w in dense])
    norm = jax.random.uniform(jax.random.key(2), (128,), jnp.float32, 0.5, 1.5).astype(jnp.bfloat16)
    for m in (1, 3):
        x = 4.0 * jax.random.normal(jax.random.key(m), (m, 1, 128), jnp.bfloat16) + 1.0      # [B, T, D]
        want = linears(rms_norm(x, norm, 1e-5), ws, Plan(matmul_impl="pallas"))
        for impl in ("pallas-fused", "xla"):
            got = linears(x, ws, Plan(matmul_impl=impl), norm=norm, eps=1e-5)
            for a, b in zip(got, want):
                assert a.shape == b.shape
                np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=2e-2, atol=2e-2)
    # Batch 1 "pallas-fused": one kernel launch and no norm outside it.
    jaxpr = jax.make_jaxpr(lambda x, ws, n: linears(x, ws, Plan(matmul_impl="pallas-fused"), norm=n))(
        jnp.ones((1, 1, 128), jnp.bfloat16), ws, norm)
    assert str(jaxpr).count("pallas_call") == 1
    outer = [e.primitive.name for e in jaxpr.jaxpr.eqns]
    assert "rsqrt" not in outer and "reduce_sum" not in outer
