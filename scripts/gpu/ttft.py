"""Where one prefill's TTFT goes on the host: the cache, the dispatch, the wait.

    python -m scripts.gpu ttft [--config llama-2-7b] [--prompt-len 2048] [--repeats 10]

Each row is the median (and min) over `repeats` single, synchronous prefills of one random prompt,
as `jllm bench` times TTFT:
- "cache": creating the empty static cache (one jitted call), waited for;
- "jit all" / "compiled all": cache creation plus the prefill, through the jitted function
  (`jllm.generate.prefill`) or its AOT-compiled executable (what `jllm bench` calls);
- "... pre-made cache": the prefill alone, its cache made and waited for before the clock starts;
- "dispatch ...": until the call returns, before waiting for its result.
Set XLA_FLAGS (e.g. --xla_gpu_enable_command_buffer=) to compare XLA's launch settings. The
kernels' own time is `python -m scripts.gpu step-profile --prefill`.
"""
import argparse
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

ROWS = ("cache", "jit all", "compiled all", "jit pre-made cache", "compiled pre-made cache",
        "dispatch jit", "dispatch compiled")


def measure(cfg: LlamaConfig, prompt_len: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per row of ROWS, `repeats` samples each (module docstring)."""
    params = parallel.random_params(cfg, None, jax.random.key(0), jnp.bfloat16)
    tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (1, prompt_len)), jnp.int32)
    n = jnp.full((1,), prompt_len, jnp.int32)
    sampling, key = Sampling.make(1), jax.random.key(0)
    kw = dict(cfg=cfg, plan=_plan.make_plan(cfg, None, _plan.default_attn_impl(), _plan.default_matmul_impl()))
    S = bucket(prompt_len + 16)

    def new():
        return init_cache(cfg, 1, S, jnp.bfloat16)

    compiled = prefill.lower(params, tokens, n, new(), sampling, key, **kw).compile()
    calls = {"jit": lambda c: prefill(params, tokens, n, c, sampling, key, **kw),
             "compiled": lambda c: compiled(params, tokens, n, c, sampling, key)}
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
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu ttft", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--prompt-len", type=int, default=2048)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args(argv)
    header()
    rows = measure(LlamaConfig.from_name(args.config), args.prompt_len, args.repeats)
    for name, v in rows.items():
        print(f"ttft {name:24s} median {statistics.median(v) * 1e3:7.2f} ms  min {min(v) * 1e3:7.2f}")
