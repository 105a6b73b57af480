"""The engine on the GPU: the kernel path against generate on the tiny model, then the offline
benchmark (jllm.engine.bench) on random weights of a named config.

    PYTHONPATH=. python3 -m scripts.gpu engine --out OUT --n 1000
"""
import argparse
import dataclasses
import itertools
import json
import os
import time

import jax

from jllm import argtypes


def say(msg: str) -> None:
    print(msg, flush=True)


def check_tiny() -> bool:
    """Greedy engine tokens (paged decode kernel, chunk rows) equal generate's on the tiny model."""
    import numpy as np

    import jllm
    from jllm.config import LlamaConfig
    from jllm.engine import Engine, SamplingParams
    from jllm.generate import Model
    from jllm.model import init_params

    jax.config.update("jax_default_matmul_precision", "highest")
    cfg = LlamaConfig.from_name("tiny")
    model = Model(params=init_params(cfg, jax.random.key(0), "float32"), cfg=cfg, attn_impl="pallas",
                  matmul_impl="xla")
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(1, 60, 24)]
    sp = SamplingParams(max_tokens=20, stop_token_ids=())
    ok = True
    for async_scheduling in (True, False):
        engine = Engine(model, max_seqs=8, page_size=16, num_pages=40, max_tokens_per_step=64, progress=False,
                        async_scheduling=async_scheduling)
        outs = engine.generate(prompts, sp)
        same = sum(o.token_ids == jllm.generate(model, [p], max_new_tokens=20, stop_token_ids=[])[0].tokens
                   for o, p in zip(outs, prompts))
        say(f"tiny pallas async={async_scheduling}: {same}/{len(prompts)} equal to generate, "
            f"{engine.stats().preemptions} preemptions")
        ok &= same == len(prompts)
    jax.config.update("jax_default_matmul_precision", None)
    return ok


def decode_step(model, rows: int, context: int, kv_cache_dtype: str | None, steps: int = 24,
                page_size: int = 16, temperature: float = 0.0, top_p: float | None = None) -> dict:
    """ms per engine step with `rows` requests all decoding at ~`context` tokens, against the
    bytes the step must read: the weights once plus every row's keys and values (and scales).
    temperature 0 runs the greedy program; above 0, a sampling one: with top_p the one whose
    cuts sort the vocabulary, without it the one for temperature alone (no sort for cuts)."""
    import numpy as np

    from jllm.engine import Engine, SamplingParams

    cfg = model.cfg
    # Prompts go in 4,096-token chunks, so the first requests decode only a few dozen steps while
    # the last are prefilled; every request then outlives the timed steps.
    budget = max(4096, 2 * rows)
    prompts_per_step = -(-(budget - rows) // context) + 1
    lead = 2 * -(-rows // (prompts_per_step - 1)) + 8  # steps until the last request has its first token
    max_len = context + lead + steps + 16
    engine = Engine(model, max_seqs=rows, page_size=page_size, num_pages=rows * (-(-max_len // page_size) + 1),
                    max_tokens_per_step=budget, decode_buckets=(rows,), chunk_buckets=(budget,),
                    max_prompts_per_step=prompts_per_step, kv_cache_dtype=kv_cache_dtype,
                    prefix_caching=False, progress=False, max_model_len=max_len)
    rng = np.random.default_rng(1)
    sp = SamplingParams(max_tokens=lead + steps + 8, temperature=temperature, top_p=top_p, stop_token_ids=())
    ids = [engine.add_request(rng.integers(3, cfg.vocab_size, context).tolist(), sp) for _ in range(rows)]
    started: set[str] = set()
    for _ in range(100_000):  # bounded: prefill of rows x context tokens in budget-sized chunks
        started.update(o.request_id for o in engine.step() if o.token_ids)
        if len(started) == rows:
            break
    before = sum(r.total for r in engine.scheduler.running)
    t = time.perf_counter()
    for _ in range(steps):
        engine.step()
    ms = 1e3 * (time.perf_counter() - t) / steps
    running = engine.scheduler.running
    if len(running) != rows:
        raise RuntimeError(f"{len(running)} requests running after the timed steps, not {rows}")
    mean_context = (before + sum(r.total for r in running)) / (2 * rows)  # keys each step reads, on average
    for i in ids:
        engine.abort(i)
    while engine.has_unfinished():
        engine.step()
    weights = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * (1 if kv_cache_dtype == "int8" else 2)
    if kv_cache_dtype == "int8":
        per_token += 2 * cfg.n_layers * cfg.n_kv_heads * 4  # a float32 scale per key/value head
    kv = rows * mean_context * per_token
    limit_ms = 1e3 * (weights + kv) / 4.4e12
    return dict(rows=rows, context=mean_context, kv_cache=kv_cache_dtype or "bf16", temperature=temperature, top_p=top_p, step_ms=ms,
                weights_gb=weights / 1e9, kv_gb=kv / 1e9, limit_ms_at_4_4_tbs=limit_ms, ratio=ms / limit_ms)


def profile_window(model, engine_kwargs: dict, n: int, prompt_len, output_len, start: int, steps: int,
                   trace_dir: str, device: str = "GPU") -> str:
    """The offline benchmark's requests, run to step `start`, then `steps` steps traced with
    jax.profiler -> the kernel table of scripts.gpu.step_profile (mixed prefill and decode steps)."""
    from jllm.engine import Engine, SamplingParams
    from jllm.engine.bench import make_requests
    from scripts.gpu import step_profile as sp

    prompts, olens = make_requests(n, model.cfg.vocab_size, tuple(prompt_len), tuple(output_len), 0)
    engine = Engine(model, **engine_kwargs, progress=False)
    for p, o in zip(prompts, olens):
        engine.add_request(p, SamplingParams(max_tokens=o, stop_token_ids=()))
    for _ in range(start):
        engine.step()
    running, waiting = len(engine.scheduler.running), len(engine.scheduler.waiting)
    jax.block_until_ready(engine.state)
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        t = time.perf_counter()
        for _ in range(steps):
            engine.step()
        jax.block_until_ready(engine.state)
        wall = 1e3 * (time.perf_counter() - t) / steps
    events = sp.read_trace(trace_dir)
    table = sp.kernel_table(sp.device_kernels(events, device), steps)
    ts = [float(e["ts"]) for e in events if e.get("ph") == "X"]
    host = "".join(f"\nhost per step: {ms / steps:8.3f} ms  x{count // steps:<5d} {name}"
                   for name, count, ms in sp.host_table(events, [(min(ts), max(ts) + 1)], device, top=20))
    while engine.has_unfinished():  # bounded: every request has a finite max_tokens
        for r in list(engine.requests):
            engine.abort(r)
        engine.step()
    kv = engine_kwargs.get("kv_cache_dtype") or "bf16"
    return sp.format_table(f"engine steps {start}..{start + steps}, {kv} pages, {running} running, "
                           f"{waiting} waiting (wall under the profiler)", wall, table) + host


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu engine", description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=".")
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--n", type=int, default=1000, help="requests (0: only the --decode-step part)")
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 1024))
    ap.add_argument("--output-len", type=int, nargs=2, default=(64, 512))
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--decode-buckets", type=int, nargs="*")
    ap.add_argument("--chunk-buckets", type=int, nargs="*")
    ap.add_argument("--chunk-row", type=int)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--sync", action="store_true")
    ap.add_argument("--matmul-impl", default="pallas-fused")
    ap.add_argument("--kv-cache", nargs="+", default=["bf16"], choices=["bf16", "int8"],
                    help="run the offline benchmark once per KV page type")
    ap.add_argument("--decode-step", type=int, nargs="*", default=[],
                    help="first time a pure decode step of --decode-rows requests at these contexts")
    ap.add_argument("--decode-rows", type=int, default=256)
    ap.add_argument("--decode-top-p", type=lambda t: None if t == "none" else float(t), nargs="+", default=[None],
                    help="the sampled --decode-step part at each top_p ('none': temperature alone; e.g. 0.95: "
                         "the program with the sort)")
    ap.add_argument("--decode-temperature", type=float, nargs="+", default=[0.0],
                    help="the --decode-step part at each temperature (0: the greedy program)")
    ap.add_argument("--profile", type=int, nargs=2, metavar=("START", "STEPS"),
                    help="first trace STEPS steps of the offline run from step START (per KV page type)")
    ap.add_argument("--device", default="GPU", help="process-name filter of the device streams in the trace")
    ap.add_argument("--device-memory-fraction", type=argtypes.probability, default=0.9,
                    help="as `jllm bench engine`'s (runs before 2026-12-04's fifth round had JAX's 0.75)")
    args = ap.parse_args(argv)

    from jllm import runtime
    runtime.set_device_memory_fraction(args.device_memory_fraction)  # before the first device use
    runtime.enable_compilation_cache()
    if not args.skip_tiny and not check_tiny():
        say("FAILED: the engine differs from generate on the GPU")
        return 1

    from jllm import parallel
    from jllm.config import LlamaConfig
    from jllm.engine.bench import format_result, make_requests, run_baseline, run_engine_bench
    from jllm.generate import Model

    cfg = LlamaConfig.from_name(args.config)
    model = Model(params=parallel.random_params(cfg, None, jax.random.key(0)), cfg=cfg, attn_impl="pallas",
                  matmul_impl=args.matmul_impl)
    for context, kv_cache, t, p in itertools.product(args.decode_step, args.kv_cache, args.decode_temperature,
                                                     args.decode_top_p):
        if t == 0 and p is not None:
            continue   # greedy: top_p means nothing
        d = decode_step(model, args.decode_rows, context, None if kv_cache == "bf16" else kv_cache, temperature=t,
                        top_p=p)
        say("decode step: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in d.items()))
    kw = dict(max_seqs=args.max_seqs, max_tokens_per_step=args.budget, page_size=args.page_size,
              max_model_len=args.prompt_len[1] + args.output_len[1], async_scheduling=not args.sync,
              decode_buckets=args.decode_buckets or None, chunk_buckets=args.chunk_buckets or None,
              chunk_row=args.chunk_row)
    if args.profile:
        for kv_cache in args.kv_cache:
            say(profile_window(model, {**kw, "kv_cache_dtype": None if kv_cache == "bf16" else kv_cache}, args.n,
                               args.prompt_len, args.output_len, *args.profile,
                               os.path.join(args.out, f"engine_trace_{kv_cache}"), args.device))
    if args.n == 0:
        return 0
    results = {}
    for kv_cache in args.kv_cache:
        kw["kv_cache_dtype"] = None if kv_cache == "bf16" else kv_cache
        say(f"engine {kw}")
        t = time.perf_counter()
        results[kv_cache] = r = run_engine_bench(
            model, n_requests=args.n, prompt_len=tuple(args.prompt_len), output_len=tuple(args.output_len),
            baseline=False, plot=os.path.join(args.out, f"engine_timeline_{kv_cache}.png"), engine_kwargs=kw)
        say(format_result(r))
        say(f"engine part ({kv_cache} pages) {time.perf_counter() - t:.1f} s")
    if not args.no_baseline:
        prompts, olens = make_requests(args.n, cfg.vocab_size, tuple(args.prompt_len), tuple(args.output_len), 0)
        base_s = run_baseline(model, prompts, olens, 64)
        for kv_cache, r in results.items():
            results[kv_cache] = r = dataclasses.replace(
                r, baseline_elapsed_s=base_s, baseline_output_tokens_per_s=r.output_tokens / base_s,
                speedup=r.output_tokens_per_s * base_s / r.output_tokens)
            say(f"{kv_cache} pages against generate (bf16 static cache, batches of 64): {r.speedup:.2f}x")
    with open(os.path.join(args.out, "engine_bench.json"), "w") as f:
        json.dump({"args": vars(args), **{k: dataclasses.asdict(r) for k, r in results.items()}}, f)
    return 0

