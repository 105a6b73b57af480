"""Benchmark with random weights of any named config: compile time, TTFT, TPOT, tokens/s, MBU, MFU.

Decode is timed as one on-device loop of `new_tokens` steps (the `decode` op `generate` uses), so
the figure is the engine's, not Python's. MBU counts the bytes a step must read: every weight but
the embedding table (one row of it), the output projection whole, and the KV cache up to the
average context; MFU counts 2 FLOPs per weight per token plus causal attention.
"""
import dataclasses
import functools
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jllm import parallel, quant
from jllm import plan as _plan
from jllm.runtime import say, write_atomic
from jllm.config import LlamaConfig
from jllm.generate import bucket, check_kv_cache_dtype, decode, prefill
from jllm.model import param_infos, to_flat
from jllm.sampling import Sampling
from sharding import rules


@dataclasses.dataclass
class BenchResult:
    config: str
    device: str
    jax_version: str
    dtype: str
    quant: str | None
    attn_impl: str
    matmul_impl: str
    batch: int
    prompt_len: int
    new_tokens: int
    cache_len: int
    compile_cold_s: float
    compile_warm_s: float | None  # None: not measured (warm_compile=False)
    ttft_ms: float
    tpot_ms: float
    decode_tok_s_per_seq: float
    decode_tok_s_total: float
    prefill_tok_s: float
    mbu: float
    mfu_prefill: float
    bandwidth_tb_s: float
    peak_tflops: float
    weight_gb: float
    peak_memory_gb: float | None
    kv_cache_dtype: str = "bfloat16"
    prefill_compiler_options: dict | None = None


def _median_time(fn, repeats: int) -> float:
    """Median wall time of fn() including the wait for its result (what a caller sees)."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def _device_time(fn, repeats: int) -> float:
    """Time per call of fn() with calls queued back to back, so host dispatch is hidden."""
    jax.block_until_ready(fn())
    t = time.perf_counter()
    outs = [fn() for _ in range(repeats)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t) / repeats


def measure_bandwidth() -> float:
    """Read bandwidth in TB/s: a sum over a buffer well past the caches (2 GiB on GPU)."""
    n = (1 << 30) if jax.default_backend() == "gpu" else (1 << 26)
    x = jnp.ones((n,), jnp.bfloat16)
    f = jax.jit(lambda x: jnp.sum(x, dtype=jnp.float32))
    return x.nbytes / _device_time(lambda: f(x), 20) / 1e12


def measure_peak_tflops() -> float:
    n = 8192 if jax.default_backend() == "gpu" else 1024
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    f = jax.jit(lambda a: a @ a)
    return 2 * n ** 3 / _device_time(lambda: f(a), 10) / 1e12


def step_bytes(params, cfg: LlamaConfig, kv_itemsize: float, batch: int, context: float,
               replicas: int = 1) -> float:
    """Bytes one decode step must read: the weights as stored (quantized or not; one embedding row
    per sequence), by each of `replicas` data-parallel copies, plus the KV cache up to `context`."""
    flat = to_flat(params)
    emb = flat.pop("tok_embeddings")
    weights = sum(x.nbytes for x in jax.tree.leaves(flat))
    if cfg.tie_embeddings:  # the output projection reads the embedding table whole
        weights += emb.nbytes
    weights = weights * replicas + batch * emb.nbytes // emb.shape[0]
    kv = 2 * cfg.n_layers * batch * context * cfg.n_kv_heads * cfg.head_dim * kv_itemsize
    return weights + kv


def prefill_flops(cfg: LlamaConfig, batch: int, prompt_len: int) -> float:
    infos = param_infos(cfg)
    matmul = sum(np.prod(i.shape) for n, i in infos.items() if len(i.shape) == 2 and n != "tok_embeddings")
    if cfg.tie_embeddings:
        matmul += cfg.vocab_size * cfg.dim
    # The output projection runs for one position per row; causal attention is half of T x T.
    matmul_flops = 2 * (matmul - cfg.dim * cfg.vocab_size) * batch * prompt_len + 2 * cfg.dim * cfg.vocab_size * batch
    attn_flops = 2 * 2 * batch * cfg.n_layers * cfg.n_heads * cfg.head_dim * prompt_len ** 2 / 2
    return matmul_flops + attn_flops


def run(cfg: LlamaConfig, name: str, *, dtype: str = "bfloat16", batch: int = 1, prompt_len: int = 128,
        new_tokens: int = 128, attn_impl: str | None = None, matmul_impl: str | None = None,
        bandwidth: float | None = None, peak_tflops: float | None = None, params=None,
        seed: int = 0, warm_compile: bool = True, mesh=None,
        kv_cache_dtype: str | None = None, prefill_compiler_options: dict | None = None,
        ) -> BenchResult:
    """Benchmark prefill and decode of `cfg` (random weights unless `params` is given).

    mesh: params already sharded on it (parallel.random_params); call inside its mesh_context.
    MBU and MFU then count the bandwidth and peak of all the mesh's devices. kv_cache_dtype:
    "int8" for an int8 cache (default: dtype). prefill_compiler_options: XLA options added to
    the prefill program's own (generate.FLOAT_PREFILL_OPTIONS for float weights), e.g.
    {"xla_gpu_enable_triton_gemm": True}, to compare GEMM back ends.
    batch, prompt_len and new_tokens are ints >= 1 and prompt_len + new_tokens must fit
    cfg.max_seq_len (ValueError otherwise). compile_warm_s is None with warm_compile=False.
    """
    _check_run(cfg, batch, prompt_len, new_tokens, bandwidth, peak_tflops)
    check_kv_cache_dtype(kv_cache_dtype)
    _plan.check_impls(attn_impl, matmul_impl)
    attn_impl = attn_impl or _plan.default_attn_impl()
    matmul_impl = matmul_impl or _plan.default_matmul_impl()  # per shard on a mesh
    dt = jnp.dtype(dtype)
    if params is None:
        say(f"initializing random {name} weights ({dtype}) on {jax.devices()[0].device_kind}")
        params = parallel.random_params(cfg, None, jax.random.key(seed), dtype)
    T = min(bucket(prompt_len), cfg.max_seq_len)
    S = min(bucket(T + new_tokens), cfg.max_seq_len)
    rng = np.random.default_rng(seed)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, T)), jnp.int32)
    n_tokens = jnp.full((batch,), prompt_len, jnp.int32)
    sampling = Sampling.make(batch)
    key = jax.random.key(seed)
    token0 = jnp.zeros((batch,), jnp.int32)
    kv_dt = jnp.dtype(kv_cache_dtype or dt)
    new_cache = functools.partial(parallel.init_cache, cfg, batch, S, kv_dt, mesh)
    # On a mesh, global arrays, so several processes can run one program.
    tokens, n_tokens, sampling, key, token0 = parallel.put_batch(
        (tokens, n_tokens, sampling, key, token0), mesh)
    kw = dict(cfg=cfg, plan=_plan.make_plan(cfg, mesh, attn_impl, matmul_impl))

    # The cache's shapes and shardings, to compile against (a sharded cache must match exactly).
    abstract_cache = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                                  new_cache())

    def compile_all():
        t = time.perf_counter()
        p = prefill.lower(params, tokens, n_tokens, abstract_cache, sampling, key, **kw).compile(
            prefill_compiler_options)
        d = decode.lower(params, token0, abstract_cache, sampling, key, n_steps=new_tokens, **kw).compile()
        return p, d, time.perf_counter() - t

    say(f"compiling prefill [{batch}, {T}] and decode ({new_tokens} steps, cache {S})")
    p_fn, d_fn, cold = compile_all()
    warm = None
    if warm_compile:
        jax.clear_caches()  # the second compile is served by the persistent compilation cache
        p_fn, d_fn, warm = compile_all()
    say(f"compile: cold {cold:.1f} s, warm {_seconds(warm)}")

    def run_prefill():
        return p_fn(params, tokens, n_tokens, new_cache(), sampling, key)

    jax.block_until_ready(run_prefill())
    ttft = _median_time(run_prefill, 10 if jax.default_backend() == "gpu" else 3)
    token, cache, key2 = run_prefill()
    jax.block_until_ready(cache)
    # Time decode from the same prefilled state each time (the cache is donated: copy it first).
    decode_times = []
    for _ in range(3):
        c = jax.tree.map(jnp.copy, cache)
        jax.block_until_ready(c)
        t = time.perf_counter()
        out, c, _ = d_fn(params, token, c, sampling, key2)
        jax.block_until_ready(out)
        decode_times.append(time.perf_counter() - t)
        del c
    tpot = min(decode_times) / new_tokens
    bw = bandwidth or measure_bandwidth()
    peak = peak_tflops or measure_peak_tflops()
    # Bytes per cached element; an int8 cache adds a float32 scale per head_dim elements.
    item = kv_dt.itemsize + (4 / cfg.head_dim if kv_dt == jnp.int8 else 0)
    n_dev = 1 if mesh is None else mesh.size
    replicas = 1 if mesh is None else rules.axis_size(mesh, "batch")  # each reads the weights
    mbu = step_bytes(params, cfg, item, batch, prompt_len + new_tokens / 2, replicas) / tpot / (n_dev * bw * 1e12)
    mfu = prefill_flops(cfg, batch, prompt_len) / ttft / (n_dev * peak * 1e12)
    stats = jax.local_devices()[0].memory_stats() or {}
    weight_gb = sum(x.nbytes for x in jax.tree.leaves(params)) / 1e9
    return BenchResult(
        config=name, device=jax.devices()[0].device_kind, jax_version=jax.__version__, dtype=dtype,
        quant=_quant_mode(params),
        attn_impl=attn_impl, matmul_impl=matmul_impl, batch=batch, prompt_len=prompt_len,
        new_tokens=new_tokens, cache_len=S, compile_cold_s=cold, compile_warm_s=warm,
        ttft_ms=ttft * 1e3, tpot_ms=tpot * 1e3, decode_tok_s_per_seq=1 / tpot,
        decode_tok_s_total=batch / tpot, prefill_tok_s=batch * prompt_len / ttft, mbu=mbu,
        mfu_prefill=mfu, bandwidth_tb_s=bw, peak_tflops=peak, weight_gb=weight_gb,
        peak_memory_gb=stats["peak_bytes_in_use"] / 1e9 if "peak_bytes_in_use" in stats else None,
        kv_cache_dtype=kv_dt.name, prefill_compiler_options=prefill_compiler_options)


def _check_run(cfg: LlamaConfig, batch, prompt_len, new_tokens, bandwidth, peak_tflops) -> None:
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name}={value!r} must be an int >= 1")
    if prompt_len + new_tokens > cfg.max_seq_len:
        raise ValueError(f"{prompt_len=} + {new_tokens=} = {prompt_len + new_tokens} positions do "
                         f"not fit the config's context of {cfg.max_seq_len} (max_seq_len)")
    for name, value in (("bandwidth", bandwidth), ("peak_tflops", peak_tflops)):
        if value is not None and not (isinstance(value, (int, float)) and 0 < value < float("inf")):
            raise ValueError(f"{name}={value!r} must be None (measure it) or a number > 0")


def _seconds(t: float | None) -> str:
    return "-" if t is None else f"{t:.1f} s"


def _quant_mode(params) -> str | None:
    w = params.layers[0].wq
    return f"int{w.bits}" if isinstance(w, quant.QArray) else None


def format_table(results: list[BenchResult]) -> str:
    head = (f"{'config':<12} {'weights':<8} {'kv':<5} {'attn':<6} {'matmul':<12} {'B':>3} {'P':>5} {'N':>4} {'TTFT ms':>8} "
            f"{'TPOT ms':>8} {'tok/s/seq':>9} {'tok/s':>8} {'MBU':>5} {'MFU':>5} {'compile s':>11}")
    lines = [head]
    for r in results:
        warm = "-" if r.compile_warm_s is None else f"{r.compile_warm_s:.1f}"
        lines.append(f"{r.config:<12} {r.quant or r.dtype:<8} {_short(r.kv_cache_dtype):<5} {r.attn_impl:<6} {r.matmul_impl:<12} {r.batch:>3} {r.prompt_len:>5} "
                     f"{r.new_tokens:>4} {r.ttft_ms:>8.2f} {r.tpot_ms:>8.3f} {r.decode_tok_s_per_seq:>9.1f} "
                     f"{r.decode_tok_s_total:>8.1f} {r.mbu:>5.0%} {r.mfu_prefill:>5.0%} "
                     f"{r.compile_cold_s:>5.1f}/{warm:<5}")
    return "\n".join(lines)


def _short(dtype: str) -> str:
    return {"bfloat16": "bf16", "float16": "f16", "float32": "f32"}.get(dtype, dtype)


def plot(results: list[BenchResult], path: str) -> None:
    """Decode tokens/s (aggregate and per sequence) against batch size, one line per setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    groups: dict[str, list[BenchResult]] = {}
    for r in results:
        groups.setdefault(f"{r.config} {r.quant or r.dtype} kv {_short(r.kv_cache_dtype)} {r.attn_impl}/{r.matmul_impl} P={r.prompt_len}", []).append(r)
    for label, rs in groups.items():
        rs.sort(key=lambda r: r.batch)
        axes[0].plot([r.batch for r in rs], [r.decode_tok_s_total for r in rs], "o-", label=label)
        axes[1].plot([r.batch for r in rs], [r.decode_tok_s_per_seq for r in rs], "o-", label=label)
    for ax, title in zip(axes, ("aggregate decode tokens/s", "decode tokens/s per sequence")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"jllm decode on {results[0].device} (jax {results[0].jax_version})")
    fig.tight_layout()
    # An interrupted run leaves no half-written image.
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=120, format=os.path.splitext(path)[1][1:] or "png"))
    plt.close(fig)


def speculative(model, spec, prompt_len: int, new_tokens: int, seed: int = 0) -> dict:
    """Batch-1 decode tokens/s of one random prompt without and with speculation (each timed on its
    second run, so compilation is out), and the speculation stats."""
    from jllm import speculative as sp
    from jllm.generate import generate
    prompt = np.random.default_rng(seed).integers(3, model.cfg.vocab_size, prompt_len).tolist()
    kw = dict(max_new_tokens=new_tokens, stop_token_ids=[])
    plain = [generate(model, [prompt], **kw)[0] for _ in range(2)][-1]
    spec_run = [sp.generate(model, [prompt], spec, **kw)[0] for _ in range(2)][-1]
    rate, spec_rate = plain.stats.decode_tokens_per_s, spec_run.stats.decode_tokens_per_s
    return {"k": spec.k, "plain_tok_s": rate, "speculative_tok_s": spec_rate,
            "speedup": spec_rate / rate if rate else 0.0, "same_tokens": plain.tokens == spec_run.tokens,
            "stats": sp.format_stats(spec_run.stats)}
