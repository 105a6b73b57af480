"""Where one decode step's time goes: a jax.profiler trace of decode steps, read back as a kernel table.

    python -m scripts.gpu step-profile [--config llama-2-7b] [--quantize int8|int4] [--batch 1 8]
        [--matmul-impl pallas pallas-fused xla] [--steps 16] [--out DIR]

Random weights; a prompt of 128 tokens is prefilled, then `steps` decode steps run as one on-device
loop inside `jax.profiler.trace(..., create_perfetto_trace=True)`. The perfetto JSON is read with
the standard library: every complete event ("X") on a device stream is a kernel. Printed per
setting: wall and kernel-busy ms per step, the idle time between kernels, and the kernels grouped
by name (launches and microseconds per step, share of busy time).
"""
import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def read_trace(trace_dir: str) -> list[dict]:
    """The events of the newest perfetto trace under trace_dir."""
    paths = sorted(glob.glob(os.path.join(trace_dir, "**", "perfetto_trace.json*"), recursive=True),
                   key=os.path.getmtime)
    if not paths:
        raise FileNotFoundError(f"no perfetto_trace.json(.gz) under {trace_dir}")
    opener = gzip.open if paths[-1].endswith(".gz") else open
    with opener(paths[-1], "rt") as f:
        data = json.load(f)
    return data["traceEvents"] if isinstance(data, dict) else data


def device_kernels(events: list[dict], device: str = "GPU") -> list[tuple[str, float, float]]:
    """(name, start us, duration us) of every complete event on a process whose name holds
    `device`; where that process has stream threads ("Stream #..."), only those (its "XLA Ops" and
    "XLA Modules" lines span the same kernels again)."""
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e.get("tid")): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    pids = {pid for pid, name in procs.items() if device in name}
    streams = {key for key, name in threads.items() if key[0] in pids and "Stream" in name}
    keep = (lambda e: (e["pid"], e.get("tid")) in streams) if streams else (lambda e: e["pid"] in pids)
    return [(e["name"], float(e["ts"]), float(e.get("dur", 0.0))) for e in events
            if e.get("ph") == "X" and e.get("pid") in pids and keep(e)]


def host_table(events: list[dict], windows: list[tuple[float, float]], device: str = "GPU",
               top: int = 25, skip: tuple[str, ...] = ()) -> list[tuple[str, int, float]]:
    """Host events (on processes whose name lacks `device`) that start inside the windows (start,
    end in trace us), grouped by name with digits as N: (name, count, ms) per window on average,
    the `top` longest. Nested events each count: a parent spans its children again."""
    procs = {e["pid"]: e.get("args", {}).get("name", "") for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals: dict[str, list] = {}
    for e in events:
        if e.get("ph") != "X" or device in procs.get(e.get("pid"), "") or e.get("name") in skip:
            continue
        ts = float(e["ts"])
        if any(t0 <= ts < t1 for t0, t1 in windows):
            row = totals.setdefault(re.sub(r"\d+", "N", e["name"])[:90], [0, 0.0])
            row[0] += 1
            row[1] += float(e.get("dur", 0.0)) / 1e3
    n = max(len(windows), 1)
    return sorted(((k, c // n, ms / n) for k, (c, ms) in totals.items()), key=lambda r: -r[2])[:top]


def _group(name: str) -> str:
    """Kernel families: XLA numbers its fusions (loop_add_fusion_12); strip the numbers."""
    return re.sub(r"[._]\d+$", "", re.sub(r"(_\d+)+(?=[^_]*$)", "", name))


def kernel_table(kernels: list[tuple[str, float, float]], steps: int) -> dict:
    """Busy time (union of kernel intervals), idle gaps between them and per-family totals, per step."""
    if not kernels:
        return {"busy_ms": 0.0, "span_ms": 0.0, "idle_ms": 0.0, "launches": 0, "rows": []}
    spans = sorted((t, t + d) for _, t, d in kernels)
    busy, (lo, hi) = 0.0, spans[0]
    for s, e in spans[1:]:
        if s > hi:
            busy += hi - lo
            lo, hi = s, e
        else:
            hi = max(hi, e)
    busy += hi - lo
    span = spans[-1][1] - spans[0][0]
    by = collections.defaultdict(lambda: [0, 0.0])
    for name, _, d in kernels:
        by[_group(name)][0] += 1
        by[_group(name)][1] += d
    total = sum(d for _, _, d in kernels)
    rows = sorted(((n, c / steps, us / steps, us / total) for n, (c, us) in by.items()), key=lambda r: -r[2])
    return {"busy_ms": busy / steps / 1e3, "span_ms": span / steps / 1e3, "idle_ms": (span - busy) / steps / 1e3,
            "launches": len(kernels) / steps, "rows": rows}


def format_table(title: str, wall_ms: float, t: dict, top: int = 18) -> str:
    lines = [f"== {title}: wall {wall_ms:.3f} ms/step, kernel-busy {t['busy_ms']:.3f}, idle between kernels "
             f"{t['idle_ms']:.3f}, {t['launches']:.0f} launches/step",
             f"{'kernel':60s} {'launches':>8s} {'us/step':>9s} {'share':>6s}"]
    for name, n, us, share in t["rows"][:top]:
        lines.append(f"{name[:60]:60s} {n:8.1f} {us:9.1f} {share:6.1%}")
    rest = t["rows"][top:]
    if rest:
        lines.append(f"{'(' + str(len(rest)) + ' more families)':60s} {sum(r[1] for r in rest):8.1f} "
                     f"{sum(r[2] for r in rest):9.1f} {sum(r[3] for r in rest):6.1%}")
    return "\n".join(lines)


def sequence(kernels: list[tuple[str, float, float]], start: int, count: int) -> str:
    """Kernels start .. start + count in launch order: name, microseconds, idle gap before it."""
    ks = sorted(kernels, key=lambda k: k[1])[start:start + count]
    lines = [f"{'#':>5s} {'kernel':60s} {'us':>7s} {'gap us':>7s}"]
    for i, (name, t, d) in enumerate(ks):
        gap = t - (ks[i - 1][1] + ks[i - 1][2]) if i else 0.0
        lines.append(f"{start + i:5d} {name[:60]:60s} {d:7.1f} {gap:7.1f}")
    return "\n".join(lines)


def profile(cfg, params, plan, batch: int, steps: int, prompt_len: int, trace_dir: str,
            device: str = "GPU", show: int = 0, kv_dtype=None) -> tuple[float, dict]:
    """Prefill prompt_len random tokens, then trace `steps` decode steps -> (wall ms per step, table).
    kv_dtype: the cache's dtype (default the weights' float dtype; jnp.int8 for an int8 cache)."""
    from jllm.generate import bucket, decode, prefill
    from jllm.kvcache import init_cache
    from jllm.sampling import Sampling
    T = bucket(prompt_len)
    S = bucket(T + 2 * steps + 8)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, T)), jnp.int32)
    n = jnp.full((batch,), prompt_len, jnp.int32)
    sampling, key = Sampling.make(batch), jax.random.key(0)
    token, cache, key = prefill(params, tokens, n, init_cache(cfg, batch, S, kv_dtype or params.norm.dtype), sampling, key,
                                cfg=cfg, plan=plan)
    saved = jax.tree.map(jnp.copy, cache)
    out, cache, _ = decode(params, token, cache, sampling, key, cfg=cfg, n_steps=steps, plan=plan)  # compile
    jax.block_until_ready(out)
    cache = jax.tree.map(jnp.copy, saved)
    t = time.perf_counter()
    out, cache, _ = decode(params, token, cache, sampling, key, cfg=cfg, n_steps=steps, plan=plan)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t) / steps * 1e3
    cache = saved
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        out, cache, _ = decode(params, token, cache, sampling, key, cfg=cfg, n_steps=steps, plan=plan)
        jax.block_until_ready(out)
    kernels = device_kernels(read_trace(trace_dir), device)
    table = kernel_table(kernels, steps)
    if show:  # a run of kernels from the middle of the traced steps: a few layers in order
        table["sequence"] = sequence(kernels, len(kernels) // 2, show)
    return wall, table


def profile_prefill(cfg, params, plan, batch: int, prompt_len: int, trace_dir: str, device: str = "GPU",
                    options: dict | None = None, reps: int = 3) -> tuple[float, dict]:
    """Trace `reps` prefills of prompt_len random tokens (compiled with XLA `options`) -> (wall ms
    per prefill, table per prefill)."""
    from jllm.generate import bucket, prefill
    from jllm.kvcache import init_cache
    from jllm.sampling import Sampling
    T = bucket(prompt_len)
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(3, cfg.vocab_size, (batch, T)), jnp.int32)
    n = jnp.full((batch,), prompt_len, jnp.int32)
    sampling, key = Sampling.make(batch), jax.random.key(0)
    new_cache = lambda: init_cache(cfg, batch, bucket(T + 16), params.norm.dtype)  # noqa: E731
    fn = prefill.lower(params, tokens, n, new_cache(), sampling, key, cfg=cfg, plan=plan).compile(options)
    jax.block_until_ready(fn(params, tokens, n, new_cache(), sampling, key))
    caches = [new_cache() for _ in range(reps)]
    jax.block_until_ready(caches)
    t = time.perf_counter()
    for c in caches:
        out = fn(params, tokens, n, c, sampling, key)
    jax.block_until_ready(out)
    wall = (time.perf_counter() - t) / reps * 1e3
    caches = [new_cache() for _ in range(reps)]
    jax.block_until_ready(caches)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for c in caches:
            out = fn(params, tokens, n, c, sampling, key)
        jax.block_until_ready(out)
    return wall, kernel_table(device_kernels(read_trace(trace_dir), device), reps)


def main(argv: list[str] | None = None) -> int:
    from jllm import parallel
    from jllm.config import LlamaConfig
    from jllm.plan import make_plan
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu step-profile", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--quantize", nargs="+", default=["none"], choices=["none", "int8", "int4"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--matmul-impl", nargs="+", default=[None], choices=["xla", "pallas", "pallas-fused"])
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--kv-cache", nargs="+", default=["auto"], choices=["auto", "int8"],
                    help="decode over a cache of the weights' float dtype (auto) or int8")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--device", default="GPU", help="process-name filter of the device streams in the trace")
    ap.add_argument("--out", default=None, help="write the tables here (summary.txt) and keep the traces")
    ap.add_argument("--sequence", type=int, default=0, metavar="N",
                    help="also list N kernels in launch order from the middle of the trace")
    ap.add_argument("--prefill", action="store_true",
                    help="profile the prefill of --prompt-len tokens instead of decode steps")
    ap.add_argument("--xla-option", action="append", default=[], metavar="KEY=VALUE",
                    help="with --prefill: an XLA option for the prefill program (repeatable); "
                         "each profile runs without and with the options")
    args = ap.parse_args(argv)
    from jllm.cli import xla_options
    options = xla_options(args.xla_option)
    cfg = LlamaConfig.from_name(args.config)
    out_dir = args.out or tempfile.mkdtemp(prefix="jllm-profile-")
    os.makedirs(out_dir, exist_ok=True)
    report = []
    for mode in args.quantize:
        params = parallel.random_params(cfg, None, jax.random.key(0), jnp.bfloat16,
                                        quantize=None if mode == "none" else mode)
        for impl in args.matmul_impl:
            plan = make_plan(cfg, None, None, impl)
            for batch in args.batch:
                title = f"{args.config} {mode if mode != 'none' else 'bf16'} matmul={plan.matmul_impl} B={batch}"
                if args.prefill:
                    for opts in [None] + ([options] if options else []):
                        name = f"{title} prefill {args.prompt_len}" + (f" {opts}" if opts else "")
                        wall, table = profile_prefill(cfg, params, plan, batch, args.prompt_len,
                                                      os.path.join(out_dir, re.sub(r"\W+", "_", name)),
                                                      args.device, opts)
                        report.append(format_table(name, wall, table).replace("/step", "/prefill"))
                        print(report[-1], flush=True)
                    continue
                for kv in args.kv_cache:
                    name = title + (" kv=int8" if kv == "int8" else "")
                    wall, table = profile(cfg, params, plan, batch, args.steps, args.prompt_len,
                                          os.path.join(out_dir, re.sub(r"\W+", "_", name)), args.device,
                                          args.sequence, jnp.int8 if kv == "int8" else None)
                    report.append(format_table(name, wall, table) + ("\n" + table["sequence"] if args.sequence else ""))
                    print(report[-1], flush=True)
        del params
    with open(os.path.join(out_dir, "summary.txt"), "w") as f:
        f.write("\n\n".join(report) + "\n")
    return 0
