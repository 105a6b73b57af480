"""Tensor and data parallelism: shardings for the params and the KV cache, and multi-process setup.

Every weight's sharding comes from its logical axes in jllm/model.py through sharding/rules.py, so
wq/wk/wv/w1/w3 and the output projection are column-parallel, wo/w2 row-parallel (XLA inserts one
all-reduce per attention and per MLP block), norms are replicated and the batch is split over the
data axis. The model code carries no sharding: jit propagates it from the committed params and
cache, and the jitted prefill/decode keep the cache's sharding (its buffers are donated in place).

Multi-process runs (one process per host, or per GPU): call `initialize_distributed` first, build
the mesh over `jax.devices()` (every process's devices), then `jllm.load(path, mesh=mesh)`. Each
process restores only the shards of its own devices, and `generate` runs the same program in every
process.
"""
import contextlib
import functools
import math
import os
import sys
import threading

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jllm import kvcache, model
from jllm import quant as _quant  # `quant` is param_shardings' argument, the mode
from jllm.config import LlamaConfig
from jllm.kvcache import KVCache, PagedKVCache, PageTable
from jllm.model import Params
from jllm.plan import make_plan
from jllm.quant import QArray, qarray_sharding
from sharding import rules
from sharding.rules import named


def param_shardings(cfg: LlamaConfig, mesh: Mesh, quant: str | None = None,
                    group_size: int | None = None) -> dict[str, NamedSharding | QArray]:
    """{flat name: NamedSharding}, keyed like model.param_infos.

    quant ("int8" | "int4", with the int4 group_size): the linear weights (quant.is_linear) are
    QArrays as `quant.quantize` lays them out, and their entries are QArrays of shardings.
    """
    _quant.check_mode(quant, group_size)
    shapes = {name: info.shape for name, info in model.param_infos(cfg).items()}
    return flat_shardings(_quant.abstract_flat(shapes, jnp.bfloat16, quant, group_size), cfg, mesh)


def flat_shardings(flat: dict, cfg: LlamaConfig, mesh: Mesh) -> dict[str, NamedSharding | QArray]:
    """Shardings for flat params as they are (a QArray of shardings where they hold a QArray)."""
    plan, infos = make_plan(cfg, mesh), model.param_infos(cfg)
    out = {}
    for name, value in flat.items():
        spec = plan.spec(infos[name].axes)
        rules.check_divisible(name, infos[name].shape, spec, mesh)
        out[name] = (qarray_sharding(value, spec, mesh) if isinstance(value, QArray)
                     else named(mesh, spec))
    return out


def shard_flat(flat: dict, cfg: LlamaConfig, mesh: Mesh) -> dict:
    """Place flat params (arrays or QArrays, anywhere) onto the mesh, one array at a time
    (each QArray carries its own layout)."""
    shardings = flat_shardings(flat, cfg, mesh)
    return {name: jax.device_put(value, shardings[name]) for name, value in flat.items()}


def shard_params(params: Params, cfg: LlamaConfig, mesh: Mesh) -> Params:
    """Place params (arrays or QArrays, on one device or on the host) onto the mesh."""
    return model.from_flat(shard_flat(model.to_flat(params), cfg, mesh), cfg)


def random_params(cfg: LlamaConfig, mesh: Mesh | None, key: jax.Array, dtype=jnp.bfloat16,
                  quantize: str | None = None, group_size: int | None = None) -> Params:
    """model.init_params made on the device, directly in its shards on a mesh (70B never sits on
    one device), quantized if asked: for benchmarks."""
    shardings = None if mesh is None else param_shardings(cfg, mesh)
    params = model.init_params(cfg, key, dtype, shardings=shardings)
    if quantize is None:
        return jax.block_until_ready(params)
    flat, _ = _quant.quantize_flat(model.to_flat(params), quantize, group_size, progress=True)
    return jax.block_until_ready(model.from_flat(flat if mesh is None else shard_flat(flat, cfg, mesh), cfg))


def cache_shardings(cfg: LlamaConfig, mesh: Mesh, quantized: bool = False) -> KVCache:
    """KVCache of shardings: k, v [B, S, G, K] with B over data and G per kv_heads_rule; an int8
    cache's scales [B, G, S] the same way."""
    plan = make_plan(cfg, mesh)
    kv = named(mesh, plan.spec(("batch", "seq", "kv_heads", "head_dim")))
    scale = [named(mesh, plan.spec(("batch", "kv_heads", "seq")))] * cfg.n_layers
    return KVCache(k=[kv] * cfg.n_layers, v=[kv] * cfg.n_layers, lengths=named(mesh, plan.spec(("batch",))),
                   k_scale=scale if quantized else None, v_scale=scale if quantized else None)


def paged_cache_shardings(cfg: LlamaConfig, mesh: Mesh, quantized: bool = False) -> PagedKVCache:
    """PagedKVCache of shardings: pages [P, page_size, G, K] with G per kv_heads_rule (the pool
    and the page table are shared by all rows, so nothing splits over data)."""
    if data_size(mesh) > 1:
        raise ValueError(f"a paged cache runs on a model-parallel mesh; got data={data_size(mesh)}")
    plan = make_plan(cfg, mesh)
    pages = [named(mesh, plan.spec((None, None, "kv_heads", "head_dim")))] * cfg.n_layers
    scales = [named(mesh, plan.spec((None, "kv_heads", None)))] * cfg.n_layers
    rep = named(mesh, PartitionSpec())
    return PagedKVCache(k_pages=pages, v_pages=pages, table=PageTable(free=rep, block_tables=rep, lengths=rep),
                        k_scale_pages=scales if quantized else None, v_scale_pages=scales if quantized else None)


@functools.cache
def _initializer(init, n_args: int, shardings, cfg: LlamaConfig, mesh: Mesh, quantized: bool):
    """`init` of n_args static arguments, jitted to create the cache in shardings(cfg, mesh, quantized)."""
    return jax.jit(init, static_argnums=tuple(range(n_args)), out_shardings=shardings(cfg, mesh, quantized))


def init_paged_cache(cfg: LlamaConfig, num_pages: int, page_size: int, batch: int, max_pages: int,
                     dtype, mesh: Mesh) -> PagedKVCache:
    """An empty paged cache created in its shards."""
    dtype = jnp.dtype(dtype)
    return _initializer(kvcache.init_paged_cache, 6, paged_cache_shardings, cfg, mesh, dtype == jnp.int8)(
        cfg, num_pages, page_size, batch, max_pages, dtype)


def init_cache(cfg: LlamaConfig, batch: int, max_len: int, dtype, mesh: Mesh | None) -> KVCache:
    """An empty cache created in its shards (no device ever holds the whole cache); without a mesh,
    kvcache.init_cache on the default device."""
    if mesh is None:
        return kvcache.init_cache(cfg, batch, max_len, dtype)
    dp = data_size(mesh)
    if batch % dp:
        raise ValueError(f"{batch=} must be a multiple of the data axis size {dp}")
    dtype = jnp.dtype(dtype)
    return _initializer(kvcache.init_cache, 4, cache_shardings, cfg, mesh, dtype == jnp.int8)(cfg, batch, max_len, dtype)


def data_size(mesh: Mesh) -> int:
    """How many ways the batch is split."""
    return rules.axis_size(mesh, "batch")


def mesh_context(mesh: Mesh | None):
    """Make `mesh` the current mesh (jax.set_mesh; jax.sharding.use_mesh on jax without it); no
    mesh (one device) changes nothing."""
    if mesh is None:
        return contextlib.nullcontext()
    set_mesh = getattr(jax, "set_mesh", None) or jax.sharding.use_mesh
    return set_mesh(mesh)


def put_batch(tree, mesh: Mesh | None):
    """Host values that every process holds whole -> global arrays on `mesh`: the leading axis of
    each leaf is the batch (split over data); scalars, PRNG keys included, are replicated. Without
    a mesh: arrays on the default device."""
    if mesh is None:
        return jax.tree.map(jnp.asarray, tree)

    def put_array(x, batched: bool) -> jax.Array:
        x = np.asarray(x)
        axes = (("batch",) + (None,) * (x.ndim - 1)) if batched else (None,) * x.ndim
        sharding = named(mesh, rules.logical_to_spec(axes))
        return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])

    def put(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):  # move the key's raw data
            data = put_array(jax.random.key_data(x), x.ndim > 0)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
        return put_array(x, np.ndim(x) > 0)

    return jax.tree.map(put, tree)


def to_host(x: jax.Array) -> np.ndarray:
    """A global array -> numpy in every process (gathered across processes when split over them)."""
    if x.is_fully_addressable or x.is_fully_replicated:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def broadcast_text(text: str | None) -> str:
    """Process 0's `text` in every process (the others pass None): chat input in multi-process runs."""
    from jax.experimental import multihost_utils
    data = np.frombuffer((text or "").encode(), np.uint8) if jax.process_index() == 0 else None
    n = int(multihost_utils.broadcast_one_to_all(np.int32(0 if data is None else data.size)))
    buf = np.zeros(max(n, 1), np.uint8)  # the same shape everywhere; only process 0's is sent
    if data is not None:
        buf[:n] = data
    return bytes(np.asarray(multihost_utils.broadcast_one_to_all(buf))[:n]).decode()


# Seconds jax.distributed waits beyond initialize_distributed's own timeout before it aborts.
_JAX_GRACE_S = 30


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, timeout_s: float = 300,
                           ) -> tuple[int, int]:
    """Join a multi-process run (jax.distributed) -> (this process's index, process count).

    With no arguments jax detects the cluster (SLURM, Open MPI, Kubernetes, Cloud TPU) or reads
    JAX_COORDINATOR_ADDRESS. Call it before anything touches a device. CPU processes exchange data
    over gloo. If the processes have not all joined within `timeout_s` seconds, this prints why
    to stderr and ends the process with status 2: jax would abort it a little later from C++
    (a check failure and a stack trace) which no Python code can catch.
    """
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not 0 < timeout_s < math.inf:
        raise ValueError(f"{timeout_s=} must be a number of seconds > 0")
    if getattr(jax.config, "jax_cpu_collectives_implementation", "gloo") in (None, "none"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS")
    joined = threading.Event()

    def give_up() -> None:
        if not joined.wait(timeout_s):
            who = f"all {num_processes} processes" if num_processes else "every process"
            print(f"gave up after {timeout_s:g} s: not {who} joined at "
                  f"{coordinator or 'the detected coordinator'}; start every process with the "
                  "same coordinator address and process count, each with its own process id, "
                  "or allow longer", file=sys.stderr, flush=True)
            os._exit(2)

    threading.Thread(target=give_up, name="initialize_distributed timeout", daemon=True).start()
    try:
        # jax's own deadline comes later, so the clear exit above happens first.
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id,
                                   initialization_timeout=math.ceil(timeout_s) + _JAX_GRACE_S)
    finally:
        joined.set()
    return jax.process_index(), jax.process_count()
