"""The `jllm` command: generate | chat | convert | bench."""
import argparse
import contextlib
import json
import os
import sys
import tempfile


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="jllm checkpoint or Hugging Face Llama directory")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--attn-impl", choices=["xla", "pallas"], default=None)
    _add_quant(p)
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="auto",
                   help="KV cache dtype: auto (the weights') or int8 (codes + per-token, per-head scales)")


KV_CACHE_CHOICES = ["auto", "int8"]


def _kv_cache_dtype(choice: str) -> str | None:
    return None if choice == "auto" else choice


def _add_quant(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers")
    p.add_argument("--group-size", type=int, default=None, help="int4 group size (default 128)")


def _env_int(name: str) -> int | None:
    return int(os.environ[name]) if os.environ.get(name) else None


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism", "a mesh of tp x dp devices; several processes (one per "
                             "host) join through jax.distributed")
    g.add_argument("--tp", type=int, default=1, help="tensor-parallel ways: heads and ffn split over devices")
    g.add_argument("--dp", type=int, default=1, help="data-parallel ways: the batch split over devices")
    g.add_argument("--coordinator", default=os.environ.get("JAX_COORDINATOR_ADDRESS"),
                   help="host:port of process 0 in a multi-process run (default $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=int, default=_env_int("JAX_NUM_PROCESSES"),
                   help="processes in the run (default $JAX_NUM_PROCESSES, or detected)")
    g.add_argument("--process-id", type=int, default=_env_int("JAX_PROCESS_ID"),
                   help="this process's index (default $JAX_PROCESS_ID, or detected)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run that jax detects (SLURM, Open MPI, Kubernetes)")


def _mesh(args):
    """Join the multi-process run if asked; the (dp, tp) mesh, or None for one device."""
    import jax
    from jllm import parallel
    from sharding import rules
    if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    if args.tp * args.dp == 1 and jax.process_count() == 1:
        return None
    mesh = rules.make_mesh(args.tp, args.dp)
    _say(f"mesh {rules.describe(mesh)}")
    return mesh


def _main_process() -> bool:
    """Only process 0 prints; the others run the same program silently."""
    import jax
    return jax.process_index() == 0


def _say(msg: str) -> None:
    if _main_process():
        print(msg, file=sys.stderr, flush=True)


def _load(args):
    import jllm
    return jllm.load(args.model, args.dtype, quantize=args.quantize, group_size=args.group_size,
                     attn_impl=args.attn_impl, mesh=_mesh(args), progress=_main_process(),
                     kv_cache_dtype=_kv_cache_dtype(args.kv_cache))


def _print_stats(results) -> None:
    if not _main_process():
        return
    for i, r in enumerate(results):
        s = r.stats
        print(f"[{i}] prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} "
              f"({r.finish_reason}), TTFT {s.ttft_s * 1e3:.1f} ms, decode {s.decode_tokens_per_s:.1f} tokens/s",
              file=sys.stderr)


def cmd_generate(args) -> int:
    import jllm
    model = _load(args)
    prompt = args.prompt
    if model.tokenizer is None:
        try:
            prompt = [int(t) for t in args.prompt.split()]
        except ValueError:
            sys.exit("this model has no tokenizer: pass --prompt as space-separated token ids")

    def stream(delta):
        sys.stdout.write(delta.text if model.tokenizer is not None
                         else "".join(f" {t}" for t in delta.token_ids))
        sys.stdout.flush()

    main = _main_process()
    if main:
        _say("preparing prefill and decode (compiled on first use of a shape, then cached on disk)")
        sys.stdout.write(args.prompt if model.tokenizer is not None else "")
    results = jllm.generate(model, [prompt], max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                            seed=args.seed, stop=args.stop, stream=stream if main else None)
    if main:
        print()
    _print_stats(results)
    return 0


def _read_line() -> str:
    """The next user line; in a multi-process run process 0 reads it and sends it to the others."""
    import jax
    line = None
    if _main_process():
        try:
            line = input("> ").strip()
        except EOFError:
            line = "/exit"
    if jax.process_count() > 1:
        from jllm import parallel
        line = parallel.broadcast_text(line)
    return line


def cmd_chat(args) -> int:
    import jllm
    from jllm.tokenizer import format_chat
    model = _load(args)
    if model.tokenizer is None:
        sys.exit("chat needs a model with a tokenizer.model")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    last = None
    main = _main_process()
    _say("jllm chat: /stats, /reset, /exit")
    while True:
        line = _read_line()
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            messages = messages[:1] if args.system else []
            _say("(conversation cleared)")
            continue
        if line == "/stats":
            if last is None:
                _say("(no reply yet)")
            else:
                s = last.stats
                _say(f"prefill: {s.prompt_tokens} tokens in {s.ttft_s * 1e3:.1f} ms "
                     f"({s.prompt_tokens / max(s.ttft_s, 1e-9):.1f} tokens/s); decode: "
                     f"{s.generated_tokens} tokens at {s.decode_tokens_per_s:.1f} tokens/s")
            continue
        if not line:
            continue
        messages.append({"role": "user", "content": line})
        ids = format_chat(messages, model.tokenizer)
        room = model.cfg.max_seq_len - len(ids)
        if room < 1:
            messages.pop()
            _say(f"(the conversation has {len(ids)} tokens, the model's context is "
                 f"{model.cfg.max_seq_len}: /reset to start over)")
            continue
        [last] = jllm.generate(model, [ids], max_new_tokens=min(args.max_new_tokens, room),
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                               seed=args.seed, stop=args.stop,
                               stream=(lambda d: (sys.stdout.write(d.text), sys.stdout.flush()))
                               if main else None)
        if main:
            print()
        messages.append({"role": "assistant", "content": last.text})


def cmd_convert(args) -> int:
    from convert import hf
    hf.convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
               quantize=args.quantize, group_size=args.group_size)
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


def cmd_bench(args) -> int:
    import jax
    from jllm import bench, parallel, runtime
    from jllm.config import LlamaConfig
    if not args.random_weights:
        sys.exit("jllm bench needs --random-weights (benchmarks run on random weights of a named config)")
    cfg = LlamaConfig.from_name(args.config)
    prefill_options = _xla_options(args.prefill_xla_option)
    mesh = _mesh(args)  # with several processes, each runs the same benchmark on its devices
    # A fresh cache directory, so "cold" is a real first compile and "warm" a persistent-cache hit.
    with tempfile.TemporaryDirectory() as cache_dir:
        if os.environ.get("JLLM_CACHE_DIR") != "off":
            runtime.enable_compilation_cache(args.cache_dir or cache_dir)
        results = []
        if mesh is None:
            params = bench.random_params(cfg, args.config, args.dtype, quantize=args.quantize,
                                         group_size=args.group_size)
            sharded = {}
        else:  # weights are made in their shards: a 70B model never sits on one device
            _say(f"initializing random {args.config} weights ({args.dtype}) in shards")
            params = parallel.random_params(cfg, mesh, jax.random.key(0), args.dtype,
                                            quantize=args.quantize, group_size=args.group_size)
            sharded = {"mesh": mesh}
        runs = [(a, m, kv, p, b) for a in args.attn_impl for m in args.matmul_impl
                for kv in args.kv_cache for p in args.prompt_len for b in args.batch]
        for attn_impl, matmul_impl, kv_cache, prompt_len, batch in runs:
            with parallel.mesh_context(mesh) if mesh is not None else contextlib.nullcontext():
                r = bench.run(cfg, args.config, dtype=args.dtype, batch=batch, prompt_len=prompt_len,
                              new_tokens=args.new_tokens, attn_impl=attn_impl,
                              matmul_impl=matmul_impl, kv_cache_dtype=_kv_cache_dtype(kv_cache),
                              prefill_compiler_options=prefill_options,
                              warm_compile=args.warm_compile and not results,
                              bandwidth=args.bandwidth, peak_tflops=args.peak_tflops, params=params,
                              **sharded)
            args.bandwidth, args.peak_tflops = r.bandwidth_tb_s, r.peak_tflops  # measure once
            results.append(r)
            _say(bench.format_table([r]).splitlines()[-1])
    if not _main_process():
        return 0
    print(bench.format_table(results))
    print(f"device {results[0].device}, jax {results[0].jax_version}, bandwidth "
          f"{results[0].bandwidth_tb_s:.2f} TB/s, peak {results[0].peak_tflops:.1f} TFLOP/s, weights "
          f"{results[0].weight_gb:.2f} GB, peak memory {results[-1].peak_memory_gb or 0:.2f} GB"
          + (f", prefill XLA options {results[0].prefill_compiler_options}"
             if results[0].prefill_compiler_options else ""))
    if args.json:
        _write_atomic(args.json, json.dumps([r.__dict__ for r in results], indent=2))
    if args.plot:
        bench.plot(results, args.plot)
    return 0


def _xla_options(items: list[str]) -> dict | None:
    """["key=value", ...] -> {key: bool | int | float | str}, or None for none."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--prefill-xla-option {item!r}: expected KEY=VALUE")
        lowered = value.lower()
        if lowered in ("true", "false"):
            out[key] = lowered == "true"
            continue
        for kind in (int, float):
            try:
                out[key] = kind(value)
                break
            except ValueError:
                pass
        else:
            out[key] = value
    return out or None


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jllm", description="Llama-2 inference in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    _add_model(p)
    p.add_argument("--prompt", required=True)
    _add_sampling(p)
    _add_parallel(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("chat", help="interactive Llama-2 chat")
    _add_model(p)
    p.add_argument("--system", default=None, help="system prompt")
    _add_sampling(p)
    _add_parallel(p)
    p.set_defaults(fn=cmd_chat)
    p = sub.add_parser("convert", help="Hugging Face Llama directory -> jllm checkpoint")
    p.add_argument("hf_dir")
    p.add_argument("out_dir")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    p.add_argument("--overwrite", action="store_true")
    _add_quant(p)
    p.set_defaults(fn=cmd_convert)
    p = sub.add_parser("bench", help="benchmark a named config with random weights")
    p.add_argument("--config", default="llama-2-7b")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    _add_quant(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=int, nargs="+", default=[128])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--attn-impl", choices=["xla", "pallas"], nargs="+", default=[None])
    p.add_argument("--matmul-impl", choices=["xla", "pallas", "pallas-fused"], nargs="+", default=[None],
                   help="quantized matmul: the Pallas kernel, the kernel with one launch for q/k/v and "
                        "for gate/up (pallas-fused), or XLA (default: pallas on GPU)")
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, nargs="+", default=["auto"],
                   help="KV cache dtype(s) to run: auto (the weights') and/or int8")
    p.add_argument("--prefill-xla-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA option for the prefill program only, e.g. "
                        "xla_gpu_enable_triton_gemm=false (repeatable)")
    p.add_argument("--bandwidth", type=float, default=None, help="TB/s for MBU (default: measured)")
    p.add_argument("--peak-tflops", type=float, default=None, help="for MFU (default: measured)")
    p.add_argument("--cache-dir", default=None, help="persistent compilation cache (default: a fresh temporary one)")
    p.add_argument("--warm-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a second compile served by the persistent cache (first run only)")
    p.add_argument("--json", default=None, help="write results to this file")
    p.add_argument("--plot", default=None, help="write a PNG of tokens/s against batch")
    _add_parallel(p)
    p.set_defaults(fn=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"jllm {args.command}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
