"""The engine on the GPU: the kernel path against generate on the tiny model, then the offline
benchmark (jllm.engine.bench) on random weights of a named config.

    PYTHONPATH=. python3 scripts/gpu_engine.py --out OUT --n 1000
"""
import argparse
import dataclasses
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def say(msg: str) -> None:
    print(msg, flush=True)


def check_tiny() -> bool:
    """Greedy engine tokens (paged decode kernel, chunk rows) equal generate's on the tiny model."""
    import jax
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


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=".")
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--prompt-len", type=int, nargs=2, default=(64, 1024))
    ap.add_argument("--output-len", type=int, nargs=2, default=(64, 512))
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--budget", type=int, default=512)
    ap.add_argument("--page-size", type=int, default=16)
    ap.add_argument("--decode-buckets", type=int, nargs="*")
    ap.add_argument("--chunk-buckets", type=int, nargs="*")
    ap.add_argument("--chunk-row", type=int)
    ap.add_argument("--no-baseline", action="store_true")
    ap.add_argument("--skip-tiny", action="store_true")
    ap.add_argument("--sync", action="store_true")
    args = ap.parse_args()

    from jllm import runtime
    runtime.enable_compilation_cache()
    if not args.skip_tiny and not check_tiny():
        say("FAILED: the engine differs from generate on the GPU")
        return 1
    from jllm.bench import random_params
    from jllm.config import LlamaConfig
    from jllm.engine.bench import format_result, make_requests, run_baseline, run_engine_bench
    from jllm.generate import Model

    cfg = LlamaConfig.from_name(args.config)
    model = Model(params=random_params(cfg, args.config), cfg=cfg, attn_impl="pallas", matmul_impl="xla")
    kw = dict(max_seqs=args.max_seqs, max_tokens_per_step=args.budget, page_size=args.page_size,
              max_model_len=args.prompt_len[1] + args.output_len[1], async_scheduling=not args.sync,
              decode_buckets=args.decode_buckets or None, chunk_buckets=args.chunk_buckets or None,
              chunk_row=args.chunk_row)
    say(f"engine {kw}")
    t = time.perf_counter()
    r = run_engine_bench(model, n_requests=args.n, prompt_len=tuple(args.prompt_len),
                         output_len=tuple(args.output_len), baseline=False,
                         plot=os.path.join(args.out, "engine_timeline.png"), engine_kwargs=kw)
    say(format_result(r))
    say(f"engine part {time.perf_counter() - t:.1f} s")
    if not args.no_baseline:
        prompts, olens = make_requests(args.n, cfg.vocab_size, tuple(args.prompt_len), tuple(args.output_len), 0)
        base_s = run_baseline(model, prompts, olens, 64)
        r = dataclasses.replace(r, baseline_elapsed_s=base_s, baseline_output_tokens_per_s=r.output_tokens / base_s,
                                speedup=r.output_tokens_per_s * base_s / r.output_tokens)
        say(format_result(r))
    with open(os.path.join(args.out, "engine_bench.json"), "w") as f:
        json.dump({"args": vars(args), **dataclasses.asdict(r)}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
