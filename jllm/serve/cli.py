"""`jllm serve`: flags, then load the model, start the engine and serve until a signal.

    jllm serve --model DIR [--host 127.0.0.1] [--port 8000] [--served-model-name NAME] ...

`add_arguments(parser)` adds the flags to a (sub)parser and `run(args)` serves; `python -m
jllm.serve.cli ...` is the same command on its own. Flag values are checked while parsing, and
the port is bound before the model loads, so a bad value or a busy port costs no load.
"""
import argparse
import os
import sys

from jllm import argtypes


_positive_int = argtypes.positive_int
_port = argtypes.number(int, lambda x: 0 <= x < 65536, "a port in 0..65535 (0: any free port)")
_fraction = argtypes.probability
_seconds = argtypes.number(float, lambda x: x >= 0, "a number of seconds >= 0")


def _name(text: str) -> str:
    if not text.strip():
        raise argparse.ArgumentTypeError("expected a non-empty name")
    return text


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="jllm checkpoint or Hugging Face Llama directory")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8000, help="port (default 8000; 0: any free port)")
    p.add_argument("--served-model-name", type=_name, default=None,
                   help="the model id clients send (default: the --model directory's name)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default=None)
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the linear layers at load")
    p.add_argument("--kv-cache", choices=["auto", "int8"], default="auto",
                   help="KV cache dtype: auto (the weights') or int8")
    p.add_argument("--tp", type=_positive_int, default=1, help="tensor-parallel devices")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja2 chat template (a file, or the template itself) instead of the checkpoint's")
    g = p.add_argument_group("engine")
    g.add_argument("--max-seqs", type=_positive_int, default=64, help="decode slots (default 64)")
    g.add_argument("--device-memory-fraction", type=_fraction, default=0.9, help=argtypes.DEVICE_MEMORY_HELP)
    g.add_argument("--memory-fraction", type=_fraction, default=0.9,
                   help="of the device memory JAX holds free after the weights, for KV pages, when "
                        "--num-pages is not given")
    g.add_argument("--num-pages", type=_positive_int, default=None, help="KV cache pages")
    g.add_argument("--max-model-len", type=_positive_int, default=None, metavar="N",
                   help="prompt + output tokens of one request (default the model's context, or what "
                        "the pages hold if less)")
    g.add_argument("--max-queue", type=_positive_int, default=None,
                   help="waiting requests beyond this get 429 (default: no limit)")
    g.add_argument("--max-tokens-per-step", type=_positive_int, default=512,
                   help="token budget of one engine step (default 512)")
    g.add_argument("--max-prompts-per-step", type=_positive_int, default=16, metavar="N",
                   help="prompts one step may take chunks of (default 16, the Engine's 4 being for "
                        "long prompts): a burst of short prompts enters in fewer steps, at N - 1 "
                        "padded chunk rows per step")
    g.add_argument("--compile-workers", type=_positive_int, default=None, metavar="N",
                   help="compile the engine's step programs N at a time in threads at start-up (default 8 on a GPU, "
                        "at most the CPU count; 1 elsewhere)")
    g.add_argument("--decode-buckets", type=_positive_int, nargs="+", default=None, metavar="N",
                   help="decode row counts compiled at start-up, the largest >= --max-seqs (default "
                        "max-seqs / 4^k); one near the usual concurrency pads fewer rows per step")
    g.add_argument("--prompt-logprobs", action="store_true",
                   help="serve echo=true with logprobs on /v1/completions (prompt scoring, e.g. "
                        "lm-eval's loglikelihood tasks): compiles a second variant of each prompt step")
    g = p.add_argument_group("speculative decoding (prompt lookup: for low concurrency)")
    g.add_argument("--speculate", type=_positive_int, default=None, metavar="K",
                   help="verify up to K drafted tokens per step for each decode (with --prompt-lookup)")
    g.add_argument("--prompt-lookup", type=_positive_int, default=None, metavar="N",
                   help="draft what followed the longest earlier n-gram (n <= N) of the prompt or output")
    p.add_argument("--shutdown-timeout", type=_seconds, default=30.0,
                   help="on SIGTERM/SIGINT, how long requests in flight may take (default 30 s)")
    p.add_argument("--log-json", action="store_true", help="log lines as JSON objects")


def served_name(args) -> str:
    return args.served_model_name or os.path.basename(os.path.normpath(os.path.abspath(
        os.path.expanduser(args.model))))


def run(args) -> int:
    """Load the model, start the engine and serve; returns the exit status (0 after a drain)."""
    if args.decode_buckets is not None:
        args.decode_buckets = sorted(set(args.decode_buckets))  # the engine takes them increasing
        if args.decode_buckets[-1] < args.max_seqs:
            raise ValueError(f"--decode-buckets {' '.join(map(str, args.decode_buckets))}: the largest must "
                             f"be >= --max-seqs {args.max_seqs}")
    if (args.speculate is None) != (args.prompt_lookup is None):
        raise ValueError("--speculate K and --prompt-lookup N go together (prompt lookup is the engine's "
                         f"proposer); got --speculate {args.speculate} --prompt-lookup {args.prompt_lookup}")
    if args.speculate is not None and args.tp > 1:
        raise ValueError(f"--speculate runs on one device; got --tp {args.tp}")
    model_dir = os.path.expanduser(args.model)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"--model {args.model!r} is not a directory (a jllm checkpoint or "
                                "a Hugging Face Llama directory)")
    from jllm.chat import compile_template, template_source
    from jllm.serve.main import bind, serve, setup_logging
    setup_logging(args.log_json)
    template = template_source(model_dir, args.chat_template)
    if template is not None:
        compile_template(template)   # a broken template fails before the load, not after
    sock = bind(args.host, args.port)   # before the load: a busy port fails in a second
    try:
        import jllm
        from jllm import runtime
        runtime.set_device_memory_fraction(args.device_memory_fraction)
        from jllm.engine import Engine
        from jllm.serve.app import create_app
        from jllm.serve.runner import EngineRunner
        mesh = None
        if args.tp > 1:
            from sharding import rules
            mesh = rules.make_mesh(args.tp, 1)
        model = jllm.load(model_dir, args.dtype, quantize=args.quantize, mesh=mesh)
        spec = None
        if args.speculate is not None:
            from jllm.speculative import PromptLookup, Speculative
            spec = Speculative(PromptLookup(args.prompt_lookup), args.speculate)
        engine = Engine(model, max_seqs=args.max_seqs, num_pages=args.num_pages,
                        memory_fraction=args.memory_fraction,
                        max_tokens_per_step=args.max_tokens_per_step,
                        kv_cache_dtype=None if args.kv_cache == "auto" else args.kv_cache,
                        max_queue=args.max_queue, decode_buckets=args.decode_buckets, speculative=spec,
                        max_prompts_per_step=args.max_prompts_per_step, compile_workers=args.compile_workers,
                        prompt_logprobs=args.prompt_logprobs, max_model_len=args.max_model_len)
        engine.prepare_guided()   # response_format and tools: their tokenizer view, now rather than mid-serving
        app = create_app(EngineRunner(engine), served_name(args), cfg=model.cfg,
                         tokenizer=model.tokenizer, chat_template=template)
        return serve(app, sock, shutdown_timeout=args.shutdown_timeout)
    finally:
        sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="jllm serve", description="OpenAI-compatible server")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"jllm serve: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
