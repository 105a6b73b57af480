"""Weight-only quantization: QArray, quantize / dequantize, and `linear`, the model's one matmul.

Layouts (the int4 nibble order is documented in pallas_kernels/quant_matmul.py, which reads it):
  int8: q int8 [in, out], symmetric absmax per output channel: scale [1, out] and group_size = in.
        An explicit group_size gives per-group int8 instead (scale [in // group_size, out]).
  int4: q int8 [in // 2, out], two's-complement nibbles, two input rows per byte; symmetric absmax
        per group of `group_size` input rows (128 by default; 32, 64, 128 or 256): scale
        [in // group_size, out].
In both, scale has shape [in // group_size, out] and the weight's float dtype, which is also the
QArray's `dtype`. Codes are clipped to +-127 (int8) or +-7 (int4), so every element is within
scale / 2 of the original weight.
"""
import dataclasses
import functools

import jax
import jax.numpy as jnp

from pallas_kernels import quant_matmul as qmm

# impl="pallas" runs a QArray through the Pallas kernel up to this many rows of x (batch x new
# tokens), per scale layout; above it, XLA. For int4 and grouped int8 the kernel reads the packed
# weight once, where XLA first writes a bf16 copy of it (4x the int4 bytes; not timed). For
# per-channel int8, XLA's `(x @ q.astype(bf16)) * scale` tied the kernel at M = 1 on an H100 (173
# vs 176 us per layer) and beat it at M = 8 and 64 (docs/perf_quant.md).
MAX_PALLAS_M_GROUPED = 64
MAX_PALLAS_M_PER_CHANNEL = 1
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Plain (unquantized) weights use XLA's GEMV: our bf16 Pallas GEMV measured 173.5 us per layer at
# M = 1 against XLA's 165.0, and 164.0 vs 177.6 tokens/s end to end (docs/perf_quant.md).
PALLAS_BF16_GEMV = False


@functools.partial(jax.tree_util.register_dataclass, data_fields=["q", "scale"],
                   meta_fields=["bits", "group_size"])
@dataclasses.dataclass(frozen=True)
class QArray:
    """A quantized [in, out] weight; `linear(x, w)` computes x @ w."""
    q: jax.Array  # int8 [in, out] (bits=8) or int8 [in // 2, out] (bits=4, two rows per byte)
    scale: jax.Array  # [in // group_size, out], the compute dtype
    bits: int  # 8 or 4
    group_size: int  # input rows per scale; == in for per-output-channel int8

    @property
    def shape(self) -> tuple[int, int]:
        """Logical [in, out] shape of the weight."""
        rows, out = self.q.shape
        return (rows * 2 if self.bits == 4 else rows, out)

    @property
    def dtype(self) -> jnp.dtype:
        return self.scale.dtype

    @property
    def ndim(self) -> int:
        return 2


def quantize(w: jax.Array, bits: int = 8, group_size: int | None = None,
             ) -> tuple[QArray, jax.Array]:
    """w [in, out] float -> (QArray, max |dequantize(qa) - w| as a float32 device scalar).

    group_size=None means per output channel for int8 and 128 for int4.
    """
    if w.ndim != 2 or not jnp.issubdtype(w.dtype, jnp.floating):
        raise ValueError(f"quantize takes a 2-D float [in, out] weight, got {w.shape=} {w.dtype=}")
    if bits not in (8, 4):
        raise ValueError(f"{bits=} must be 8 or 4")
    k, _ = w.shape
    if group_size is None:
        group_size = k if bits == 8 else 128
    if bits == 4 and group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 {group_size=} must be one of {INT4_GROUP_SIZES}")
    if group_size < 1 or k % group_size:
        raise ValueError(f"weight shape {w.shape}: in={k} is not a multiple of {group_size=}")
    return _quantize(w, bits=bits, group_size=group_size)


@functools.partial(jax.jit, static_argnames=("bits", "group_size"))
def _quantize(w: jax.Array, *, bits: int, group_size: int) -> tuple[QArray, jax.Array]:
    k, n = w.shape
    qmax = 127 if bits == 8 else 7
    wg = w.astype(jnp.float32).reshape(k // group_size, group_size, n)  # [in/G, G, out]
    absmax = jnp.max(jnp.abs(wg), axis=1)  # [in/G, out]
    scale = (absmax / qmax).astype(w.dtype)
    # Round with the stored scale, so the bound scale/2 holds for what dequantize computes; an
    # all-zero group (or a scale that underflows the dtype) gets scale 1 and codes 0.
    scale = jnp.where(scale == 0, jnp.ones_like(scale), scale)
    s32 = scale.astype(jnp.float32)[:, None, :]  # [in/G, 1, out]
    q = jnp.clip(jnp.round(wg / s32), -qmax, qmax).astype(jnp.int8)  # [in/G, G, out]
    err = jnp.max(jnp.abs(q.astype(jnp.float32) * s32 - wg))
    q = q.reshape(k, n)
    if bits == 4:
        q = qmm.pack_int4(q, group_size)  # [in/2, out]
    return QArray(q=q, scale=scale, bits=bits, group_size=group_size), err


def dequantize(qa: QArray, dtype: jnp.dtype = jnp.bfloat16) -> jax.Array:
    """QArray -> [in, out] weight in `dtype` (float32 product, rounded once)."""
    q = qmm.unpack_int4(qa.q, qa.group_size) if qa.bits == 4 else qa.q  # int8 [in, out]
    k, n = q.shape
    w = q.reshape(k // qa.group_size, qa.group_size, n).astype(jnp.float32)  # [in/G, G, out]
    w = w * qa.scale.astype(jnp.float32)[:, None, :]
    return w.reshape(k, n).astype(dtype)


def _max_pallas_m(w: QArray) -> int:
    per_channel = w.bits == 8 and w.group_size == w.q.shape[0]
    return MAX_PALLAS_M_PER_CHANNEL if per_channel else MAX_PALLAS_M_GROUPED


def _xla_qmatmul(x: jax.Array, w: QArray) -> jax.Array:
    """x [M, in] @ w -> [M, out] float32, in plain XLA."""
    if w.bits == 8 and w.group_size == w.q.shape[0]:
        # Per-channel scales commute with the matmul: scale the [M, out] output, not the weight.
        y = jnp.dot(x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
        return y * w.scale.astype(jnp.float32)
    return jnp.dot(x, dequantize(w, x.dtype), preferred_element_type=jnp.float32)


IMPLS = ("xla", "pallas", "pallas-fused")


def linear(x: jax.Array, w: jax.Array | QArray, *, impl: str = "xla", spec=None) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] in x's dtype; w is an Array or a QArray.

    impl="xla" is plain jnp. impl="pallas" runs QArrays through the Pallas kernel when the
    flattened batch M is small (decode; see MAX_PALLAS_M_*) and through XLA above it (prefill). On
    CPU the kernel runs in interpret mode, so impl="pallas" works everywhere. Under a mesh the
    kernel runs per shard when `spec` (the float weight's PartitionSpec) is given; XLA otherwise,
    since it cannot split a custom call and would gather the weight. "pallas-fused" is "pallas"
    here; it differs in `linears`.
    """
    return linears(x, (w,), impl=impl, specs=(spec,))[0]


def linears(x: jax.Array, ws, *, impl: str = "xla", specs=None) -> tuple[jax.Array, ...]:
    """x [..., in] @ each w of ws -> tuple of [..., out_i], as `linear` does one weight.

    impl="pallas-fused" runs QArrays of one layout that share x (q, k, v; gate, up) through one
    kernel launch (quant_matmul_multi): one grid over all their output blocks, where small
    projections alone would leave the GPU part idle. Plain float weights take the same kernel's
    bits=16 GEMV at M = 1 (XLA above M = 1). Under a mesh the launch runs per shard. Other impls
    run one `linear` per weight.
    """
    if impl not in IMPLS:
        raise ValueError(f"{impl=} must be one of {IMPLS}")
    specs = tuple(specs) if specs is not None else (None,) * len(ws)
    *lead, k = x.shape
    for w in ws:
        if len(w.shape) != 2 or w.shape[0] != k:
            raise ValueError(f"linear: {x.shape=} does not match weight shape {w.shape}")
    x2 = x.reshape(-1, k)  # [M, in]
    m = x2.shape[0]
    on_cpu = jax.default_backend() == "cpu"
    groups = [[i] for i in range(len(ws))]
    if impl == "pallas-fused" and _same_layout(ws):
        groups = [list(range(len(ws)))]
    ys = [None] * len(ws)
    for idx in groups:
        group, w = [ws[i] for i in idx], ws[idx[0]]
        group_specs = [specs[i] for i in idx]
        if not isinstance(w, QArray):
            out = None
            if len(group) > 1 and m == 1:  # pallas-fused float weights: the kernel's bits=16 GEMV
                out = _kernel(x2, group, group_specs, interpret=on_cpu)
            elif impl != "xla" and PALLAS_BF16_GEMV and m == 1 and not on_cpu:
                out = _kernel(x2, group, group_specs, interpret=on_cpu)
            if out is None:
                out = [jnp.matmul(x2, g).astype(x.dtype) for g in group]
        elif impl != "xla" and m <= _max_pallas_m(w):
            out = _kernel(x2, group, group_specs, interpret=on_cpu)
            if out is None and len(group) > 1:  # laid out differently: one call per weight
                out = [linear(x2, g, impl="pallas", spec=s) for g, s in zip(group, group_specs)]
            elif out is None:
                out = [_xla_qmatmul(x2, w).astype(x.dtype)]
        else:
            out = [_xla_qmatmul(x2, g).astype(x.dtype) for g in group]
        for i, y in zip(idx, out):
            ys[i] = y.reshape(*lead, ws[i].shape[1])  # [..., out]
    return tuple(ys)


def _kernel(x2: jax.Array, group: list, specs: list, *, interpret: bool) -> list | None:
    """x2 [M, in] @ each weight of group through the Pallas kernel, one launch: QArrays of one
    layout or plain float weights (bits=16). Under a mesh it runs per shard when every weight's
    spec is known; None where it cannot (the caller falls back)."""
    mesh = jax.sharding.get_abstract_mesh()
    if not (mesh.empty or mesh.size == 1):
        if None in specs:
            return None
        from jllm import kernels  # kernels -> parallel -> model -> quant
        return kernels.sharded_quant_matmul(x2, group, specs, mesh)
    w = group[0]
    pairs = [(g.q, g.scale) for g in group] if isinstance(w, QArray) else [(g, None) for g in group]
    bits, group_size = (w.bits, w.group_size) if isinstance(w, QArray) else (16, 0)
    if len(group) == 1:
        return [qmm.quant_matmul(x2, *pairs[0], bits=bits, group_size=group_size, interpret=interpret)]
    return list(qmm.quant_matmul_multi(x2, pairs, bits=bits, group_size=group_size, interpret=interpret))


def _same_layout(ws) -> bool:
    """Weights the fused kernel can take together: QArrays of the same bits, groups and dtypes,
    or plain float weights of one dtype."""
    w0 = ws[0]
    if len(ws) < 2:
        return False
    if not isinstance(w0, QArray):
        return all(not isinstance(w, QArray) and w.dtype == w0.dtype for w in ws)
    return all(
        isinstance(w, QArray) and (w.bits, w.group_size, w.q.dtype, w.scale.dtype, w.scale.shape[0])
        == (w0.bits, w0.group_size, w0.q.dtype, w0.scale.dtype, w0.scale.shape[0]) for w in ws)


# --- Whole-model quantization -------------------------------------------------------------------

MODES = {"int8": 8, "int4": 4}
# Every matmul weight of the model; the embedding table stays in float (it is gathered, not
# multiplied, and reading one row per token costs nothing).
LINEAR = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")


def is_linear(name: str) -> bool:
    """Flat param names ("layers.3.wq", "output") that `quantize_flat` quantizes."""
    return name == "output" or name.rsplit(".", 1)[-1] in LINEAR


def check_mode(mode: str | None, group_size: int | None = None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize={mode!r}; expected one of {sorted(MODES)} or None")
    if group_size is not None and (mode != "int4" or group_size not in INT4_GROUP_SIZES):
        raise ValueError(f"group_size={group_size!r} applies to int4 only and must be one of "
                         f"{INT4_GROUP_SIZES}")


def quantize_flat(flat: dict[str, jax.Array], mode: str, group_size: int | None = None,
                  ) -> tuple[dict[str, jax.Array | QArray], float]:
    """Quantize every linear weight of flat params; return them and the largest abs error.

    Originals are dropped as they are replaced, so peak memory stays near the float model's.
    """
    check_mode(mode, group_size)
    out, max_err = {}, 0.0
    for name in list(flat):
        w = flat.pop(name)
        if is_linear(name):
            try:
                w, err = quantize(jnp.asarray(w), MODES[mode], group_size)
            except ValueError as e:
                raise ValueError(f"cannot quantize {name} to {mode}: {e}") from None
            max_err = max(max_err, float(err))
        out[name] = w
    return out, max_err


def abstract_flat(shapes: dict[str, tuple[int, ...]], dtype, mode: str | None,
                  group_size: int | None = None, shardings: dict | None = None) -> dict[str, object]:
    """Restore targets (ShapeDtypeStructs, QArrays of them) for flat params stored in `mode`.

    shardings: {name: sharding} (a QArray of shardings for quantized weights) to restore into.
    """
    out = {}
    for name, shape in shapes.items():
        sh = shardings[name] if shardings is not None else None
        if mode is None or not is_linear(name):
            out[name] = jax.ShapeDtypeStruct(shape, dtype, sharding=sh)
            continue
        bits = MODES[mode]
        k, n = shape
        gs = group_size or (k if bits == 8 else 128)
        out[name] = QArray(q=jax.ShapeDtypeStruct((k // 2 if bits == 4 else k, n), jnp.int8,
                                                  sharding=sh and sh.q),
                           scale=jax.ShapeDtypeStruct((k // gs, n), dtype, sharding=sh and sh.scale),
                           bits=bits, group_size=gs)
    return out
