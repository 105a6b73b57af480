"""Where one prefill's TTFT goes on the host: the cache, the dispatch, the wait.

    python -m scripts.gpu ttft [--config llama-2-7b] [--prompt-len 2048] [--repeats 10] [--trace DIR]

Each row is the median (and min) over `repeats` single, synchronous prefills of one random prompt,
as `jllm bench` times TTFT:
- "cache": creating the empty static cache (one jitted call), waited for;
- "jit all" / "compiled all": cache creation plus the prefill, through the jitted function
  (`jllm.generate.prefill`) or its AOT-compiled executable (what `jllm bench` calls);
- "... pre-made cache": the prefill alone, its cache made and waited for before the clock starts;
- "dispatch ...": until the call returns, before waiting for its result;
- "jit after idle": as "jit pre-made cache", after the GPU idled IDLE_S (a lone request reaching an
  idle server; the rows above run their calls back to back, as `jllm bench` does);
- "jit after idle, same cache": the same, into the cache the call before returned (its lengths
  zeroed), so the cache's buffers keep their device addresses from call to call.
Set XLA_FLAGS (e.g. --xla_gpu_enable_command_buffer=) to compare XLA's launch settings. The
kernels' own time is `python -m scripts.gpu step-profile --prefill`.

--trace DIR then traces `repeats` more single prefills (jax.profiler, cache made before each) and
splits each call: from the call to its first kernel, the kernels' span (busy and idle), and from
the last kernel to the call's return.
"""
import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jllm import parallel
from jllm import plan as _plan
from jllm.config import LlamaConfig
from jllm.generate import bucket, prefill
from jllm.kvcache import init_cache
from jllm.sampling import Sampling
from scripts.gpu.common import header
from scripts.gpu.step_profile import device_kernels, host_table, read_trace

CALL = "ttft call"  # the host annotation around each traced prefill

ROWS = ("cache", "jit all", "compiled all", "jit pre-made cache", "compiled pre-made cache",
        "dispatch jit", "dispatch compiled", "jit after idle", "jit after idle, same cache")
IDLE_S = 0.05  # the GPU's rest before an "after idle" call and before each traced call


@dataclasses.dataclass
class Setup:
    """A random-weight model's prefill of one random prompt: its arguments, and a fresh cache."""
    cfg: LlamaConfig
    prompt_len: int

    def __post_init__(self):
        cfg, T = self.cfg, self.prompt_len
        self.params = parallel.random_params(cfg, None, jax.random.key(0), jnp.bfloat16)
        self.args = (jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, T)), jnp.int32),
                     jnp.full((1,), T, jnp.int32))
        self.sampling, self.key = Sampling.make(1), jax.random.key(0)
        self.kw = dict(cfg=cfg, plan=_plan.make_plan(cfg, None, _plan.default_attn_impl(),
                                                     _plan.default_matmul_impl()))

    def new_cache(self):
        return init_cache(self.cfg, 1, bucket(self.prompt_len + 16), jnp.bfloat16)

    def __call__(self, cache, fn=None):
        """The prefill into `cache`, through the jitted function or the compiled `fn`."""
        if fn is None:
            return prefill(self.params, *self.args, cache, self.sampling, self.key, **self.kw)
        return fn(self.params, *self.args, cache, self.sampling, self.key)

    def again(self, out):
        """The cache a prefill returned, emptied again (lengths 0): the same buffers as before."""
        return dataclasses.replace(out[1], lengths=jnp.zeros_like(out[1].lengths))

    def compiled(self):
        return prefill.lower(self.params, *self.args, self.new_cache(), self.sampling, self.key,
                             **self.kw).compile()


def measure(setup: Setup, repeats: int) -> dict[str, list[float]]:
    """Seconds per row of ROWS, `repeats` samples each (module docstring)."""
    new = setup.new_cache
    compiled = setup.compiled()
    calls = {"jit": setup, "compiled": lambda c: setup(c, compiled)}
    for call in calls.values():
        jax.block_until_ready(call(new()))
    rows = {name: [] for name in ROWS}
    for _ in range(repeats):
        t = time.perf_counter()
        jax.block_until_ready(new())
        rows["cache"].append(time.perf_counter() - t)
        for name, call in calls.items():
            t = time.perf_counter()
            jax.block_until_ready(call(new()))
            rows[f"{name} all"].append(time.perf_counter() - t)
            c = jax.block_until_ready(new())
            t = time.perf_counter()
            out = call(c)
            rows[f"dispatch {name}"].append(time.perf_counter() - t)
            jax.block_until_ready(out)
            rows[f"{name} pre-made cache"].append(time.perf_counter() - t)
            del out
        c = jax.block_until_ready(new())
        time.sleep(IDLE_S)
        t = time.perf_counter()
        jax.block_until_ready(setup(c))
        rows["jit after idle"].append(time.perf_counter() - t)
    out = jax.block_until_ready(setup(new()))
    for _ in range(repeats):  # the returned cache back in: its buffers keep their addresses
        c = jax.block_until_ready(setup.again(out))
        time.sleep(IDLE_S)
        t = time.perf_counter()
        out = jax.block_until_ready(setup(c))
        rows["jit after idle, same cache"].append(time.perf_counter() - t)
    return rows


def call_breakdown(events: list[dict], device: str = "GPU") -> list[dict[str, float]]:
    """Per host annotation CALL in a perfetto trace: ms from its start to its first device kernel
    ("before"), of kernels busy and idle between them, and from the last kernel's end to its end
    ("after"), over the kernels that start inside it (none: only "call")."""
    kernels = sorted(device_kernels(events, device), key=lambda k: k[1])
    rows = []
    for e in sorted((e for e in events if e.get("ph") == "X" and e.get("name") == CALL), key=lambda e: e["ts"]):
        t0, t1 = float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0.0))
        inside = [(s, s + d) for _, s, d in kernels if t0 <= s <= t1]
        row = {"call": (t1 - t0) / 1e3}
        if inside:
            busy, end = 0.0, inside[0][0]
            for s, e_ in inside:  # union of the kernel intervals
                busy += max(0.0, e_ - max(s, end))
                end = max(end, e_)
            span = end - inside[0][0]
            row.update(before=(inside[0][0] - t0) / 1e3, busy=busy / 1e3, idle=(span - busy) / 1e3,
                       after=(t1 - end) / 1e3, kernels=len(inside))
        rows.append(row)
    return rows


def host_events(events: list[dict], device: str = "GPU") -> list[tuple[str, int, float]]:
    """step_profile.host_table over each CALL's span from its start to its first kernel."""
    kernels = sorted(device_kernels(events, device), key=lambda k: k[1])
    windows = []
    for c in (e for e in events if e.get("ph") == "X" and e.get("name") == CALL):
        t0, t1 = float(c["ts"]), float(c["ts"]) + float(c.get("dur", 0.0))
        windows.append((t0, next((s for _, s, _ in kernels if t0 <= s <= t1), t1)))
    return host_table(events, windows, device, skip=(CALL,))


def trace_calls(setup: Setup, repeats: int, trace_dir: str, device: str = "GPU",
                same_cache: bool = False) -> list[dict[str, float]]:
    """`repeats` traced single prefills -> call_breakdown of each; each into a new cache, or with
    same_cache into the one the call before returned."""
    out = jax.block_until_ready(setup(setup.new_cache()))
    caches = [jax.block_until_ready(setup.new_cache()) for _ in range(0 if same_cache else repeats)]
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for i in range(repeats):
            c = jax.block_until_ready(setup.again(out)) if same_cache else caches[i]
            time.sleep(IDLE_S)  # the GPU idles between calls, as between a user's requests
            with jax.profiler.TraceAnnotation(CALL):
                out = jax.block_until_ready(setup(c))
    events = read_trace(trace_dir)
    for name, count, ms in host_events(events, device):
        print(f"ttft host before the first kernel: {ms:8.3f} ms  x{count:<5d} {name}")
    return call_breakdown(events, device)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu ttft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--trace", default=None, metavar="DIR", help="also trace single prefills into DIR")
    ap.add_argument("--same-cache", action="store_true",
                    help="trace prefills into the cache the call before returned (same buffers)")
    ap.add_argument("--device", default="GPU", help="process-name filter of the device streams in the trace")
    args = ap.parse_args(argv)
    header()
    setup = Setup(LlamaConfig.from_name(args.config), args.prompt_len)
    rows = measure(setup, args.repeats)
    for name, v in rows.items():
        print(f"ttft {name:24s} median {statistics.median(v) * 1e3:7.2f} ms  min {min(v) * 1e3:7.2f}")
    if args.trace:
        calls = trace_calls(setup, args.repeats, args.trace, args.device, args.same_cache)
        for i, c in enumerate(calls):
            print(f"ttft traced call {i}: " + ", ".join(
                f"{k} {v:.2f} ms" if k != "kernels" else f"{v} kernels" for k, v in c.items()))
