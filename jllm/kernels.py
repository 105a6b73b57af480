"""The model's door to the Pallas kernels: picks the kernel for the call and hides the backend.

On a machine without a GPU the same kernels run in Pallas interpret mode (slow, but exact), which
is how the CPU tests check the wiring. Under a mesh (jax.set_mesh) the kernels run per shard in
shard_map: XLA cannot partition a custom call and would otherwise gather every head onto every
device.
"""
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels import _triton
from pallas_kernels.decode_attention import decode_attention
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.quant_matmul import quant_matmul
from sharding import rules


def _interpret() -> bool:
    return jax.default_backend() != "gpu"


def supported(q: jax.Array, k: jax.Array) -> bool:
    """Shapes the Triton kernels tile: head_dim a power of two >= 16, a power-of-two GQA ratio."""
    K, R = q.shape[-1], q.shape[2] // k.shape[2]
    return K >= 16 and K & (K - 1) == 0 and R & (R - 1) == 0


def _attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
               kv_len: jax.Array) -> jax.Array:
    if not supported(q, k):  # any other shape still runs, through the XLA path
        from jllm.model import attention_xla
        return attention_xla(q, k, v, q_offset, kv_len)
    with _triton.quiet():
        if q.shape[1] == 1:  # decode: the one query sits at kv_len - 1 and sees every cached key
            return decode_attention(q[:, 0], k, v, kv_len, interpret=_interpret())[:, None]
        return flash_attention(q, k, v, q_offset, kv_len, interpret=_interpret())


def sharded_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
                      kv_len: jax.Array, mesh: jax.sharding.AbstractMesh, local_attention=None,
                      ) -> jax.Array:
    """Attention per shard (the Pallas kernels, or `local_attention`): batch over data, query
    heads over model, KV heads per the rule."""
    local_attention = local_attention or _attention
    H, G = q.shape[2], k.shape[2]
    tp = rules.axis_size(mesh, "heads")
    rl = rules.kv_heads_rule(H, G, tp)
    q_spec = rules.logical_to_spec(("batch", "seq", "heads", "head_dim"), rl)
    kv_spec = rules.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), rl)
    row_spec = rules.logical_to_spec(("batch",), rl)
    kv_replicated = tp > 1 and rl["kv_heads"] is None

    def local(q, k, v, q_offset, kv_len):  # q [B/dp, T, H/tp, K]; k, v [B/dp, S, G or G/tp, K]
        if kv_replicated:  # this shard's query heads all read one KV head (rules.kv_heads_rule)
            g = jax.lax.axis_index(rl["heads"]) * G // tp
            k = jax.lax.dynamic_slice_in_dim(k, g, 1, axis=2)                     # [B/dp, S, 1, K]
            v = jax.lax.dynamic_slice_in_dim(v, g, 1, axis=2)
        return local_attention(q, k, v, q_offset, kv_len)

    return jax.shard_map(local, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, row_spec, row_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v, q_offset, kv_len)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, q_offset: jax.Array,
              kv_len: jax.Array) -> jax.Array:
    """Same contract as model.attention_xla: q [B, T, H, K]; k, v [B, S, G, K] -> [B, T, H, K]."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return sharded_attention(q, k, v, q_offset, kv_len, mesh)
    return _attention(q, k, v, q_offset, kv_len)


def sharded_quant_matmul(x: jax.Array, w, spec: PartitionSpec, mesh: jax.sharding.AbstractMesh,
                         ) -> jax.Array | None:
    """x [M, K] @ QArray w whose float weight has `spec` (mesh axes of in, out), run per shard.

    Column-parallel weights (out split) give each device its output columns; row-parallel ones
    (in split, x split the same way) give partial sums, all-reduced here in float32. Rows of x
    split over the data axis. Returns None where the quantized layout does not split like x
    (int4 groups that do not divide over the input axis): the caller then uses XLA.
    """
    from jllm import parallel  # parallel imports the model, which imports this module
    in_axis, out_axis = spec
    shardings = parallel.qarray_sharding(w, spec, mesh)
    q_spec, s_spec = shardings.q.spec, shardings.scale.spec
    split_in = in_axis if in_axis is not None and mesh.shape[in_axis] > 1 else None
    if (q_spec[0] if len(q_spec) else None) != split_in:  # int4 groups that do not divide
        return None
    rows = rules.logical_to_spec(("batch",))[0]
    per_channel = w.bits == 8 and w.scale.shape[0] == 1

    def local(x, q, scale):  # x [M/dp, K/tp or K]; q, scale: this device's part
        k = x.shape[1]
        y = quant_matmul(x, q, scale, bits=w.bits, group_size=k if per_channel else w.group_size,
                         interpret=_interpret())
        if in_axis is not None:
            y = jax.lax.psum(y.astype(jnp.float32), in_axis).astype(x.dtype)
        return y

    with _triton.quiet():
        return jax.shard_map(local, mesh=mesh,
                             in_specs=(PartitionSpec(rows, in_axis), q_spec, s_spec),
                             out_specs=PartitionSpec(rows, out_axis), check_vma=False)(x, w.q, w.scale)
