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
import numbers

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jllm import runtime
from jllm.plan import Plan
from pallas_kernels import quant_matmul as qmm
from sharding import rules

# impl="pallas" runs a QArray through the Pallas kernel up to this many rows of x (batch x new
# tokens), per scale layout; above it, XLA. For int4 and grouped int8 the kernel reads the packed
# weight once, where XLA first writes a bf16 copy of it (4x the int4 bytes; not timed). For
# per-channel int8, XLA's `(x @ q.astype(bf16)) * scale` tied the kernel at M = 1 on an H100 (173
# vs 176 us per layer) and beat it at M = 8 and 64 (docs/perf_quant.md).
MAX_PALLAS_M_GROUPED = 64
MAX_PALLAS_M_PER_CHANNEL = 1
# matmul_impl "pallas-fused" runs plain float weights through the kernel's bits=16 path up to this
# many rows of x (XLA's GEMM above it), and with PALLAS_FLOAT_SINGLE also the weights that have no
# partner sharing x (o and down), not only q/k/v and gate/up.
MAX_PALLAS_M_FLOAT = 1
PALLAS_FLOAT_SINGLE = False
INT4_GROUP_SIZES = (32, 64, 128, 256)


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

    @property
    def per_channel(self) -> bool:
        """int8 with one scale row: a scale per output channel (group_size == in)."""
        return self.bits == 8 and self.scale.shape[0] == 1


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
    if not _is_int(group_size):  # 64.0 == 64 would pass the checks below, then fail in reshape
        raise ValueError(f"{group_size=} must be an int")
    group_size = int(group_size)
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
    return MAX_PALLAS_M_PER_CHANNEL if w.per_channel else MAX_PALLAS_M_GROUPED


def _xla_qmatmul(x: jax.Array, w: QArray) -> jax.Array:
    """x [M, in] @ w -> [M, out] float32, in plain XLA."""
    if w.per_channel:
        # Per-channel scales commute with the matmul: scale the [M, out] output, not the weight.
        y = jnp.dot(x, w.q.astype(x.dtype), preferred_element_type=jnp.float32)
        return y * w.scale.astype(jnp.float32)
    if w.bits == 4:
        # Low and high nibbles as two matmuls of K/2 rows each, every weight element dequantized
        # elementwise from its byte: unpacking into one [K, N] weight interleaves the halves of each
        # group, and XLA ran that concatenate as a separate slow kernel (3x the int8 prefill).
        m, (kh, n) = x.shape[0], w.q.shape
        g = w.group_size
        q = w.q.reshape(kh * 2 // g, g // 2, n)                                  # [K/G, G/2, N]
        s = w.scale.astype(jnp.float32)[:, None, :]                              # [K/G, 1, N]
        xg = x.reshape(m, kh * 2 // g, 2, g // 2)                                # [M, K/G, 2, G/2]
        lo, hi = ((codes.astype(jnp.float32) * s).astype(x.dtype).reshape(kh, n)  # [K/2, N] each
                  for codes in ((q << 4) >> 4, q >> 4))  # sign-extended low, high nibbles
        return (jnp.dot(xg[:, :, 0].reshape(m, kh), lo, preferred_element_type=jnp.float32)
                + jnp.dot(xg[:, :, 1].reshape(m, kh), hi, preferred_element_type=jnp.float32))
    return jnp.dot(x, dequantize(w, x.dtype), preferred_element_type=jnp.float32)


def rms_norm(x: jax.Array, w: jax.Array, eps: float) -> jax.Array:
    """x [..., D] / sqrt(mean(x^2) + eps) * w [D]; in float32, rounded to x's dtype before w."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return y.astype(x.dtype) * w


def linear(x: jax.Array, w: jax.Array | QArray, plan: Plan = Plan(), *, spec=None) -> jax.Array:
    """x [..., in] @ w [in, out] -> [..., out] in x's dtype; w is an Array or a QArray.

    matmul_impl "xla" is plain jnp. "pallas" runs QArrays through the Pallas kernel when the
    flattened batch M is small (decode; see MAX_PALLAS_M_*) and through XLA above it (prefill).
    Under a mesh the kernel runs per shard when `spec` (the float weight's PartitionSpec) is given;
    XLA otherwise, since it cannot split a custom call and would gather the weight. Plain float
    weights use XLA's GEMV ("pallas-fused" differs in `linears`).
    """
    return linears(x, (w,), plan, specs=(spec,))[0]


def linears(x: jax.Array, ws, plan: Plan = Plan(), *, specs=None, norm: jax.Array | None = None,
            eps: float = 1e-6) -> tuple[jax.Array, ...]:
    """x [..., in] @ each w of ws -> tuple of [..., out_i], as `linear` does one weight; with
    norm [in], rms_norm(x, norm, eps) @ each w.

    matmul_impl "pallas-fused" runs QArrays of one layout that share x (q, k, v; gate, up)
    through one kernel launch (quant_matmul_multi): one grid over all their output blocks, where
    small projections alone would leave the GPU part idle. Plain float weights take the same
    kernel's bits=16 GEMV at M = 1 (XLA above M = 1). That launch also computes the norm in its
    prologue (norm in x's dtype; under a mesh where the input axis is not split). Under a mesh the
    launch runs per shard. Other impls run one `linear` per weight.
    """
    specs = tuple(specs) if specs is not None else (None,) * len(ws)
    *lead, k = x.shape
    for w in ws:
        if len(w.shape) != 2 or w.shape[0] != k:
            raise ValueError(f"linear: {x.shape=} does not match weight shape {w.shape}")
    x2 = x.reshape(-1, k)  # [M, in]
    fused = plan.matmul_impl == "pallas-fused" and _same_layout(ws)
    if norm is not None:
        w, m, out = ws[0], x2.shape[0], None
        if fused and norm.shape == (k,) and norm.dtype == x.dtype and (
                m <= _max_pallas_m(w) if isinstance(w, QArray) else m <= MAX_PALLAS_M_FLOAT):
            out = _kernel(x2, list(ws), list(specs), plan, norm=(norm, eps))
        if out is None:
            return linears(rms_norm(x, norm, eps), ws, plan, specs=specs)
    elif fused:
        out = _matmuls(x2, list(ws), list(specs), plan)
    else:
        out = [_matmuls(x2, [w], [spec], plan)[0] for w, spec in zip(ws, specs)]
    return tuple(y.reshape(*lead, w.shape[1]) for y, w in zip(out, ws))  # [..., out] each


def _matmuls(x2: jax.Array, group: list, specs: list, plan: Plan) -> list:
    """x2 [M, in] @ each weight of group (several only where `_same_layout`) -> [M, out] each in
    x2's dtype: through the Pallas kernel where the plan and M allow it (see `linear`), else XLA."""
    w, m, out = group[0], x2.shape[0], None
    if not isinstance(w, QArray):
        if plan.matmul_impl == "pallas-fused" and m <= MAX_PALLAS_M_FLOAT and (
                len(group) > 1 or PALLAS_FLOAT_SINGLE):  # the kernel's bits=16 path
            out = _kernel(x2, group, specs, plan)
        return out if out is not None else [jnp.matmul(x2, g).astype(x2.dtype) for g in group]
    if plan.matmul_impl != "xla" and m <= _max_pallas_m(w):
        out = _kernel(x2, group, specs, plan)
        if out is None and len(group) > 1:  # laid out differently: one call per weight
            out = [_matmuls(x2, [g], [spec], plan)[0] for g, spec in zip(group, specs)]
    return out if out is not None else [_xla_qmatmul(x2, g).astype(x2.dtype) for g in group]


def _kernel(x2: jax.Array, group: list, specs: list, plan: Plan, norm=None) -> list | None:
    """x2 [M, in] @ each weight of group through the Pallas kernel, one launch: QArrays of one
    layout or plain float weights (bits=16); norm=(weight, eps) normalizes x2 in the kernel. Under
    a mesh it runs per shard when every weight's spec is known; None where it cannot (the caller
    falls back)."""
    if plan.sharded:
        return None if None in specs else sharded_matmul(x2, group, specs, plan, norm=norm)
    return _launch(x2, group, plan.interpreted, norm)


def _launch(x: jax.Array, group: list, interpret: bool, norm=None) -> list:
    """One quant_matmul_multi launch: x [M, K] @ each weight of group (QArrays of one layout, or
    float weights: the kernel's bits=16 GEMV); x and the weights may be one device's parts
    (per-channel scales then cover its K rows). norm=(weight, eps): RMSNorm of x first."""
    w0 = group[0]
    if isinstance(w0, QArray):
        pairs = [(w.q, w.scale) for w in group]
        bits, group_size = w0.bits, x.shape[1] if w0.per_channel else w0.group_size
    else:
        pairs, bits, group_size = [(w, None) for w in group], 16, 0
    kw = {} if norm is None else dict(norm=norm[0], eps=norm[1])
    return list(qmm.quant_matmul_multi(x, pairs, bits=bits, group_size=group_size, interpret=interpret, **kw))


def qarray_sharding(qa: QArray, spec: PartitionSpec, mesh) -> QArray:
    """Shardings for a quantized [in, out] weight whose float version has `spec`.

    q follows the weight. Scales [in // group_size, out] follow the output axis, and the input
    axis only where every shard holds whole groups; per-output-channel scales [1, out] apply to
    every input row, so a row-parallel q is split while its scale row is replicated.
    """
    in_axis, out_axis = spec
    n_groups = qa.scale.shape[0]
    ways = 1 if in_axis is None else mesh.shape[in_axis]
    groups_axis = in_axis if n_groups % ways == 0 else None
    # int4 packs two rows of one group into a byte, so its packed rows split only with the groups.
    q_axis = in_axis if qa.per_channel else groups_axis
    return QArray(q=rules.named(mesh, PartitionSpec(q_axis, out_axis)),
                  scale=rules.named(mesh, PartitionSpec(None if qa.per_channel else groups_axis, out_axis)),
                  bits=qa.bits, group_size=qa.group_size)


def sharded_matmul(x: jax.Array, ws: Sequence, specs: Sequence[PartitionSpec],
                   plan: Plan, norm=None) -> list | None:
    """x [M, K] @ each weight of ws (QArrays of one layout, or plain float weights: the kernel's
    bits=16 GEMV), whose float weights have `specs` (mesh axes of in, out), run per shard: one
    kernel launch per device for all of them (quant_matmul_multi).

    Column-parallel weights (out split) give each device its output columns; row-parallel ones
    (in split, x split the same way) give partial sums, all-reduced here in float32. Rows of x
    split over the data axis. Returns None where the quantized layout does not split like x
    (int4 groups that do not divide over the input axis, or weights split differently along the
    input): the caller then uses XLA or one call per weight. norm=(weight, eps): the kernel's
    RMSNorm of x, for weights whose input axis is not split (each device holds whole rows of x);
    None otherwise.
    """
    mesh = plan.mesh
    in_axis = specs[0][0]
    split_in = in_axis if in_axis is not None and mesh.shape[in_axis] > 1 else None
    if norm is not None and in_axis is not None:
        return None
    w_specs = []  # a plain weight splits as its spec says; a QArray's q and scale per qarray_sharding
    for w, spec in zip(ws, specs):
        if spec[0] != in_axis:
            return None
        if isinstance(w, QArray):
            spec = jax.tree.map(lambda sharding: sharding.spec, qarray_sharding(w, spec, mesh))
            if (spec.q[0] if len(spec.q) else None) != split_in:
                return None
        w_specs.append(spec)
    row_axis = plan.spec(("batch",))[0]

    def local(x, ws, norm_w):  # x [M/dp, K/tp or K]; ws: this device's part of each weight
        ys = _launch(x, ws, plan.interpreted, None if norm is None else (norm_w, norm[1]))
        if in_axis is not None:
            ys = [jax.lax.psum(y.astype(jnp.float32), in_axis).astype(x.dtype) for y in ys]
        return tuple(ys)

    # A norm is replicated: every device normalizes its whole rows.
    return list(jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(row_axis, in_axis), w_specs, PartitionSpec()),
                              out_specs=tuple(PartitionSpec(row_axis, spec[1]) for spec in specs),
                              check_vma=False)(x, list(ws), None if norm is None else norm[0]))


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


def _is_int(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_mode(mode: str | None, group_size: int | None = None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"quantize={mode!r}; expected one of {sorted(MODES)} or None")
    if group_size is not None and (mode != "int4" or not _is_int(group_size)
                                   or group_size not in INT4_GROUP_SIZES):
        raise ValueError(f"group_size={group_size!r} applies to int4 only and must be an int, one of "
                         f"{INT4_GROUP_SIZES}")


def quantize_flat(flat: dict[str, jax.Array], mode: str, group_size: int | None = None,
                  progress: bool = False) -> tuple[dict[str, jax.Array | QArray], float]:
    """Quantize every linear weight of flat params; return them and the largest abs error.

    Originals are dropped as they are replaced, so peak memory stays near the float model's.
    """
    check_mode(mode, group_size)
    out, max_err = {}, 0.0
    for name in runtime.progress(list(flat), len(flat), f"quantizing to {mode}", progress):
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
