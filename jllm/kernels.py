"""The model's door to the Pallas kernels: picks the kernel for the call and hides the backend.

On a machine without a GPU the same kernels run in Pallas interpret mode (slow, but exact), which
is how the CPU tests check the wiring. Under a mesh (jax.set_mesh) the kernels run per shard in
shard_map: XLA cannot partition a custom call and would otherwise gather every head onto every
device.
"""
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels import _triton
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.quant_matmul import quant_matmul_multi
from sharding import rules


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def supported(q: jax.Array, k: jax.Array) -> bool:
    """Shapes the Triton kernels tile: head_dim a power of two >= 16, a power-of-two GQA ratio."""
    K, R = q.shape[-1], q.shape[2] // k.shape[2]
    return K >= 16 and K & (K - 1) == 0 and R & (R - 1) == 0


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
               kv_len: jax.Array, k_scale: jax.Array | None = None,
               v_scale: jax.Array | None = None) -> jax.Array:
    if not supported(q, k) or (k_scale is not None and q.shape[1] > 1):
        # Any other shape still runs, through the XLA path (the model dequantizes an int8 cache
        # itself before a multi-token step, so the second case is a direct caller's).
        from jllm.model import attention_xla
        return attention_xla(q, k, v, q_offset, kv_len, k_scale, v_scale)
    with _triton.quiet():
        if q.shape[1] == 1:  # decode: the one query sits at kv_len - 1 and sees every cached key
            return decode_attention(q[:, 0], k, v, kv_len, k_scale=k_scale, v_scale=v_scale,
                                    interpret=_interpret())[:, None]
        return flash_attention(q, k, v, q_offset, kv_len, interpret=_interpret())


def sharded_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
                      kv_len: jax.Array, mesh: jax.sharding.AbstractMesh, local_attention=None,
                      k_scale: jax.Array | None = None, v_scale: jax.Array | None = None,
                      ) -> jax.Array:
    """Attention per shard (the Pallas kernels, or `local_attention`): batch over data, query
    heads over model, KV heads (and an int8 cache's scales) per the rule."""
    local_attention = local_attention or _attention
    H, G = q.shape[2], k.shape[2]
    tp = rules.axis_size(mesh, "heads")
    rl = rules.kv_heads_rule(H, G, tp)
    q_spec = rules.logical_to_spec(("batch", "seq", "heads", "head_dim"), rl)
    kv_spec = rules.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rl)
    scale_spec = rules.logical_to_spec(("batch", "kv_heads", "seq"), rl)
    row_spec = rules.logical_to_spec(("batch",), rl)
    kv_replicated = tp > 1 and rl["kv_heads"] is None
    scales = () if k_scale is None else (k_scale, v_scale)

    def local(q, k, v, q_offset, kv_len, *scales):  # q [B/dp, T, H/tp, K]; k, v [B/dp, S, G or G/tp, K]
        if kv_replicated:  # this shard's query heads all read one KV head (rules.kv_heads_rule)
            g = jax.lax.axis_index(rl["heads"]) * G // tp
            k, v = (jax.lax.dynamic_slice_in_dim(a, g, 1, axis=2) for a in (k, v))  # [.., S, 1, K]
            scales = [jax.lax.dynamic_slice_in_dim(a, g, 1, axis=1) for a in scales]  # [.., 1, S]
        return local_attention(q, k, v, q_offset, kv_len, *scales)

    in_specs = (q_spec, kv_spec, kv_spec, row_spec, row_spec) + (scale_spec,) * len(scales)
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=q_spec,
                         check_vma=False)(q, k, v, q_offset, kv_len, *scales)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
              kv_len: jax.Array, k_scale: jax.Array | None = None,
              v_scale: jax.Array | None = None) -> jax.Array:
    """Same contract as model.attention_xla: q [B, T, H, K]; k, v [B, S, G, K] (int8 with
    k_scale, v_scale [B, G, S] for an int8 cache) -> [B, T, H, K]."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return sharded_attention(q, k, v, q_offset, kv_len, mesh, k_scale=k_scale, v_scale=v_scale)
    return _attention(q, k, v, q_offset, kv_len, k_scale, v_scale)


def sharded_quant_matmul(x: jax.Array, ws: Sequence, specs: Sequence[PartitionSpec],
                         mesh: jax.sharding.AbstractMesh) -> tuple[jax.Array, ...] | None:
    """x [M, K] @ each weight of ws (QArrays of one layout, or plain float weights: the kernel's
    bits=16 GEMV), whose float weights have `specs` (mesh axes of in, out), run per shard: one
    kernel launch per device for all of them (quant_matmul_multi).

    Column-parallel weights (out split) give each device its output columns; row-parallel ones
    (in split, x split the same way) give partial sums, all-reduced here in float32. Rows of x
    split over the data axis. Returns None where the quantized layout does not split like x
    (int4 groups that do not divide over the input axis, or weights split differently along the
    input): the caller then uses XLA or one call per weight.
    """
    from jllm import parallel  # parallel imports the model, which imports this module
    from jllm.quant import QArray
    in_axis = specs[0][0]
    split_in = in_axis if in_axis is not None and mesh.shape[in_axis] > 1 else None
    w0 = ws[0]
    quantized = isinstance(w0, QArray)
    w_specs = []
    for w, spec in zip(ws, specs):
        if spec[0] != in_axis:
            return None
        if not quantized:  # a plain weight is split as its spec says
            w_specs.append(spec)
            continue
        shardings = parallel.qarray_sharding(w, spec, mesh)
        q_spec = shardings.q.spec
        if (q_spec[0] if len(q_spec) else None) != split_in:
            return None
        w_specs += [q_spec, shardings.scale.spec]
    rows = rules.logical_to_spec(("batch",))[0]
    per_channel = quantized and w0.bits == 8 and w0.scale.shape[0] == 1

    def local(x, *parts):  # x [M/dp, K/tp or K]; parts: this device's part of each weight
        pairs = list(zip(parts[::2], parts[1::2])) if quantized else [(w, None) for w in parts]
        bits, group_size = (w0.bits, x.shape[1] if per_channel else w0.group_size) if quantized else (16, 0)
        ys = quant_matmul_multi(x, pairs, bits=bits, group_size=group_size, interpret=_interpret())
        if in_axis is not None:
            ys = tuple(jax.lax.psum(y.astype(jnp.float32), in_axis).astype(x.dtype) for y in ys)
        return ys

    arrays = [a for w in ws for a in ((w.q, w.scale) if quantized else (w,))]
    with _triton.quiet():
        return jax.shard_map(local, mesh=mesh, in_specs=(PartitionSpec(rows, in_axis), *w_specs),
                             out_specs=tuple(PartitionSpec(rows, spec[1]) for spec in specs),
                             check_vma=False)(x, *arrays)
