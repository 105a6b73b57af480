"""Mesh axes, the logical-axis rules, and the one place that names mesh axes.

Tensor parallelism follows Megatron-LM (Shoeybi et al. 2019, section 3): the first matmul of each
block (wq/wk/wv, w1/w3) is split by columns (its output heads or ffn units) over `model`, the second
(wo, w2) by rows, so each device computes a slice of the heads or of the ffn units and one all-reduce
per block (which XLA inserts for the row-parallel matmul) restores the full [B, T, D] activation.
The batch is split over `data`. Weights name their axes logically ("heads", "ffn", ...) in
jllm/model.py; the RULES table maps those names to mesh axes.
"""
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

DATA, MODEL = "data", "model"
MESH_AXES = (DATA, MODEL)

RULES: dict[str, str | None] = {
    "batch": DATA,        # rows of a batch (activations, KV cache, lengths)
    "seq": None,          # token positions: the cache length S and new tokens T
    "embed": None,        # the residual stream D stays whole on every device
    "heads": MODEL,       # query heads: wq columns, wo rows
    "kv_heads": MODEL,    # KV heads: wk/wv columns, the cache's G axis (see kv_heads_rule)
    "head_dim": None,     # K
    "ffn": MODEL,         # w1/w3 columns, w2 rows
    # The embedding table is split by vocab rows, not by D: the same split then makes a tied output
    # projection column-parallel (logits [B, V/tp] per device, no [V, D] all-gather), and the
    # lookup costs one all-reduce of [B, T, D] (each device gathers the rows it holds, zeros
    # elsewhere); an embed split would instead leave x split on D and force an all-gather of the
    # residual stream before the first norm.
    "vocab": MODEL,
}


def logical_to_spec(axes: Sequence[str | None], rules: dict[str, str | None] = RULES) -> PartitionSpec:
    """Logical axis names, e.g. ("embed", "heads") -> PartitionSpec(None, "model")."""
    spec = []
    for name in axes:
        if name is not None and name not in rules:
            raise ValueError(f"logical axis {name!r} has no rule; known: {sorted(rules)}")
        spec.append(None if name is None else rules[name])
    used = [a for a in spec if a is not None]
    if len(used) != len(set(used)):
        raise ValueError(f"logical axes {tuple(axes)} put two dimensions on one mesh axis: {tuple(spec)}")
    return PartitionSpec(*spec)


def named(mesh: Mesh, spec: PartitionSpec) -> NamedSharding:
    """NamedSharding in the canonical form jit gives its outputs (mesh axes of size 1 and trailing
    Nones dropped), so a donated cache comes back with an equal sharding and decode compiles once."""
    axes = [a if a is not None and mesh.shape[a] > 1 else None for a in spec]
    while axes and axes[-1] is None:
        axes.pop()
    return NamedSharding(mesh, PartitionSpec(*axes))


def make_mesh(tp: int, dp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data=dp, model=tp) mesh over `devices` (default: every device of every process).

    The model axis is the fast one, so the devices of one tensor-parallel group are neighbours
    (one host, one NVLink domain) and only the batch crosses hosts when dp > 1.
    """
    for name, value in (("tp", tp), ("dp", dp)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be a positive int")
    devices = list(jax.devices() if devices is None else devices)
    if tp * dp != len(devices):
        raise ValueError(f"tp * dp = {tp} * {dp} = {tp * dp} must equal the number of devices used, "
                         f"{len(devices)} (pass devices=... or set CUDA_VISIBLE_DEVICES to use fewer)")
    auto = (jax.sharding.AxisType.Auto,) * 2  # XLA propagates shardings; the model has no explicit ones
    return jax.make_mesh((dp, tp), MESH_AXES, axis_types=auto, devices=devices)


def axis_size(mesh: Mesh | jax.sharding.AbstractMesh, logical: str, rules=RULES) -> int:
    """How many ways `mesh` splits the logical axis (1 when the rule replicates it)."""
    axis = rules[logical]
    return 1 if axis is None or axis not in mesh.axis_names else mesh.shape[axis]


def kv_heads_rule(n_heads: int, n_kv_heads: int, tp: int) -> dict[str, str | None]:
    """RULES for a model with `n_kv_heads` KV heads on `tp` model shards: the one KV-head decision.

    Each model shard holds n_heads / tp query heads, a contiguous run. With n_kv_heads >= tp the KV
    heads split the same way (wk/wv columns and the cache's G axis), and the query heads of shard i
    are exactly those that read shard i's KV heads, so attention needs no communication. With fewer
    KV heads than shards (Llama-2-70B's 8 on tp=16, or GQA 2 on tp=4) a KV head cannot be split, so
    wk, wv and the cache are replicated over `model` (each shard computes and caches every KV head)
    while the query heads stay split. Because tp is then a multiple of n_kv_heads, all of shard i's
    query heads read one KV head, i * n_kv_heads // tp, which is what XLA's reshape of H into
    [G, R] picks and what the Pallas path in jllm/kernels.py slices out.
    """
    if n_heads % tp:
        raise ValueError(f"{n_heads=} is not divisible by {tp=}: query heads must split evenly")
    if n_kv_heads >= tp:
        if n_kv_heads % tp:
            raise ValueError(f"{n_kv_heads=} is not divisible by {tp=}")
        return RULES
    if tp % n_kv_heads:
        raise ValueError(f"{tp=} is not a multiple of {n_kv_heads=}: a shard's query heads would "
                         f"straddle two KV heads")
    return {**RULES, "kv_heads": None}


def check_divisible(name: str, shape: Sequence[int], spec: PartitionSpec, mesh: Mesh) -> None:
    """Raise unless every split dimension of `name` divides evenly over its mesh axis."""
    for dim, axis in zip(shape, spec):
        if axis is not None and dim % mesh.shape[axis]:
            raise ValueError(f"{name}: dimension {dim} of shape {tuple(shape)} does not split over "
                             f"mesh axis {axis!r} of size {mesh.shape[axis]}")


def describe(mesh: Mesh) -> str:
    """'data=1 model=8 (8 devices, 2 processes)', for logs."""
    n_proc = len({d.process_index for d in mesh.devices.flat})
    return (" ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
            + f" ({mesh.size} devices, {n_proc} process{'es' if n_proc > 1 else ''})")
