"""Plan: how a model runs, decided once per model and passed to jit as a static argument.

The attention and matmul implementations, the mesh and the KV-head sharding rule, and whether the
Pallas kernels run compiled or in interpret mode. Every function below the public API reads these
from the plan instead of loose strings and ambient-mesh lookups.
"""
import dataclasses

import jax
from jax.sharding import PartitionSpec

from jllm.config import LlamaConfig
from sharding import rules

ATTN_IMPLS = ("xla", "pallas")
MATMUL_IMPLS = ("xla", "pallas", "pallas-fused")
# XLA options of the jitted model programs that pass over the weights once per call: the prefill
# of float weights, speculative verification and the engine step. XLA's dot merger joins two
# matmuls of one input into one (q and k: a [D, 2D] weight); the weights are arguments, so the
# joined weight is a copy made on every call: 128 MB per 7B layer, 1.07 ms of a 2048-token
# prefill on an H200. Without it: TTFT 44.35 -> 42.69 ms, the engine's 256-row decode step
# 26.10 -> 25.53 ms. The decode and draft loops keep it: there the copy is made once before the
# loop, and the joined GEMM is the faster one at batch 8 (239.2 against 236.2 tok/s).
# docs/PERFORMANCE.md, 2026-12-04, fifth round.
XLA_OPTIONS = {"xla_disable_hlo_passes": "dot-merger"}


def check_impls(attn_impl: str | None, matmul_impl: str | None) -> None:
    """None (the default for this backend) or one of ATTN_IMPLS / MATMUL_IMPLS."""
    if attn_impl is not None and attn_impl not in ATTN_IMPLS:
        raise ValueError(f"attn_impl={attn_impl!r}; expected one of {ATTN_IMPLS}")
    if matmul_impl is not None and matmul_impl not in MATMUL_IMPLS:
        raise ValueError(f"matmul_impl={matmul_impl!r}; expected one of {MATMUL_IMPLS}")


def on_gpu() -> bool:
    return jax.default_backend() == "gpu"


def default_attn_impl() -> str:
    """Pallas kernels on GPU, plain XLA elsewhere (CPU, TPU)."""
    return "pallas" if on_gpu() else "xla"


def default_matmul_impl() -> str:
    """On GPU the Pallas kernels, q/k/v and gate/up fused into one launch each: on an H200 the
    fastest at batch 1 (int8 342 vs 306 tok/s, bf16 226 vs 223) and equal at batch 8
    (docs/PERFORMANCE.md, 2026-12-03); XLA elsewhere."""
    return "pallas-fused" if on_gpu() else "xla"


@dataclasses.dataclass(frozen=True)
class Plan:
    """Static choices of one model run (hashable: a static jit argument).

    attn_impl "xla" | "pallas"; matmul_impl "xla" | "pallas" | "pallas-fused" (q/k/v and gate/up
    as one kernel launch). mesh: None for one device, else the (data, model) mesh the params live
    on; kernels then run per shard. kv_replicated: the KV heads are replicated over the model axis
    (rules.kv_heads_rule). interpret: run Pallas kernels in interpret mode; None decides by the
    backend when the kernels are traced (interpret without a GPU): the one place that decides it.
    """
    attn_impl: str = "xla"
    matmul_impl: str = "xla"
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh | None = None
    kv_replicated: bool = False
    interpret: bool | None = None

    def __post_init__(self):
        check_impls(self.attn_impl, self.matmul_impl)

    @property
    def interpreted(self) -> bool:
        return (not on_gpu()) if self.interpret is None else self.interpret

    @property
    def sharded(self) -> bool:
        return self.mesh is not None and self.mesh.size > 1

    @property
    def rules(self) -> dict[str, str | None]:
        """The logical-axis rules of this run: KV heads split, or replicated over the model axis."""
        return {**rules.RULES, "kv_heads": None} if self.kv_replicated else rules.RULES

    @property
    def tp(self) -> int:
        return rules.axis_size(self.mesh, "heads") if self.sharded else 1

    def spec(self, axes: tuple[str | None, ...]) -> PartitionSpec:
        return rules.logical_to_spec(axes, self.rules)


def make_plan(cfg: LlamaConfig, mesh=None, attn_impl: str | None = None,
              matmul_impl: str | None = None) -> Plan:
    """The plan for `cfg` on `mesh` (None: one device); None impls pick this backend's default."""
    check_impls(attn_impl, matmul_impl)
    if mesh is not None and mesh.size == 1:
        mesh = None  # one device: nothing to shard
    tp = 1 if mesh is None else rules.axis_size(mesh, "heads")
    return Plan(attn_impl=attn_impl or default_attn_impl(),
                matmul_impl=matmul_impl or default_matmul_impl(), mesh=mesh,
                kv_replicated=tp > 1 and rules.kv_heads_rule(cfg.n_heads, cfg.n_kv_heads, tp)["kv_heads"] is None)
