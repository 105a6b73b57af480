"""The `jllm` command: generate | chat | convert | bench [engine | serve] | serve.

Flag values are checked when the command line is parsed (argument types) or right after
(`_check`), before any weights load, so a bad value costs no model load or run. Over 400 lines
because every subcommand's flags, their pre-load checks and the interactive chat loop live here,
one reading of the whole command line; the server's own flags are jllm/serve/cli.py's.
"""
import argparse
import contextlib
import dataclasses
import itertools
import json
import math
import os
import pathlib
import sys
import tempfile

import jax

import jllm
from jllm import argtypes, bench, chat, hf, parallel, quant, runtime, speculative
from jllm.argtypes import non_negative_float, non_negative_int, positive_float, positive_int, probability
from jllm.config import CONFIGS, LlamaConfig
from jllm.generate import Model
from jllm.plan import default_attn_impl, default_matmul_impl
from jllm.runtime import say
from sharding import rules

CHAT_HELP = ("commands: /help (this list), /stats (the last reply's timings), /reset (clear the "
             "conversation), /exit (or Ctrl-D); Ctrl-C stops a reply; start a message with // to "
             "send a literal /")
_INTERRUPT = "\x03"  # Ctrl-C at the chat prompt, as process 0 sends it to the others


def _utf8_problem(text: str) -> str | None:
    """Why `text` is not valid UTF-8 (bytes that were not UTF-8 arrive as lone surrogates), or None."""
    try:
        text.encode("utf-8")
        return None
    except UnicodeEncodeError as e:
        code = ord(text[e.start])
        what = f"the byte 0x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else f"U+{code:04X}"
        return f"{what} at character {e.start + 1} is not valid UTF-8"


def _text(text: str) -> str:
    """Non-empty UTF-8 text (a prompt, a stop string, a system prompt)."""
    if not text:
        raise argparse.ArgumentTypeError("expected non-empty text, got ''")
    problem = _utf8_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


def _address(text: str) -> str:
    host, sep, port = text.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise argparse.ArgumentTypeError(f"expected HOST:PORT (port 1-65535), got {text!r}")
    return text


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=positive_int, default=256)
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 means greedy")
    p.add_argument("--top-k", type=positive_int, default=None)
    p.add_argument("--top-p", type=probability, default=None, help="in (0, 1]")
    p.add_argument("--min-p", type=argtypes.unit_interval, default=None,
                   help="in [0, 1]: keep tokens at least this share of the most likely one's probability")
    p.add_argument("--seed", type=argtypes.seed, default=0)
    p.add_argument("--stop", type=_text, action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--presence-penalty", type=argtypes.penalty, default=0.0,
                   help="lower a token's logit by this once it has been generated (in [-2, 2])")
    p.add_argument("--frequency-penalty", type=argtypes.penalty, default=0.0,
                   help="lower a token's logit by this per time it has been generated (in [-2, 2])")
    p.add_argument("--repetition-penalty", type=argtypes.repetition_penalty, default=1.0,
                   help="divide (multiply, if negative) the logit of a token in the prompt or the output "
                        "by this (Hugging Face's; 1: none)")
    p.add_argument("--logit-bias", type=argtypes.logit_bias_entry, action="append", default=None,
                   metavar="ID=BIAS", help="add BIAS (in [-100, 100]; -100 bans the token) to token ID's "
                                           "logit (repeatable)")


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
    p.add_argument("--group-size", type=int, choices=quant.INT4_GROUP_SIZES, default=None,
                   help="int4 group size (default 128)")


def _add_parallel(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("parallelism", "a mesh of tp x dp devices; several processes (one per "
                             "host) join through jax.distributed")
    g.add_argument("--tp", type=positive_int, default=1,
                   help="tensor-parallel ways: heads and ffn split over devices")
    g.add_argument("--dp", type=positive_int, default=1,
                   help="data-parallel ways: the batch split over devices")
    # String defaults from the environment go through `type` too, so they are checked the same way.
    g.add_argument("--coordinator", type=_address, default=os.environ.get("JAX_COORDINATOR_ADDRESS") or None,
                   help="host:port of process 0 in a multi-process run (default $JAX_COORDINATOR_ADDRESS)")
    g.add_argument("--num-processes", type=positive_int, default=os.environ.get("JAX_NUM_PROCESSES") or None,
                   help="processes in the run (default $JAX_NUM_PROCESSES, or detected)")
    g.add_argument("--process-id", type=non_negative_int, default=os.environ.get("JAX_PROCESS_ID") or None,
                   help="this process's index (default $JAX_PROCESS_ID, or detected)")
    g.add_argument("--distributed", action="store_true",
                   help="join a multi-process run that jax detects (SLURM, Open MPI, Kubernetes)")
    g.add_argument("--distributed-timeout", type=positive_float, default=300, metavar="SECONDS",
                   help="how long to wait for every process to join before giving up (default 300)")


def _mesh(args):
    """Join the multi-process run if asked; the (dp, tp) mesh, or None for one device."""
    if args.distributed or args.coordinator or args.num_processes or args.process_id is not None:
        # Printed by every process (which one is process 0 is not known yet): a missing peer
        # otherwise looks like a hang.
        print(f"waiting for {args.num_processes or 'all'} processes at "
              f"{args.coordinator or 'the detected coordinator'} "
              f"(timeout {args.distributed_timeout:g} s)", file=sys.stderr, flush=True)
        parallel.initialize_distributed(args.coordinator, args.num_processes, args.process_id,
                                        timeout_s=args.distributed_timeout)
    if args.tp * args.dp == 1 and jax.process_count() == 1:
        return None
    mesh = rules.make_mesh(args.tp, args.dp)
    say(f"mesh {rules.describe(mesh)}")
    return mesh


def _main_process() -> bool:
    """Only process 0 prints; the others run the same program silently."""
    return jax.process_index() == 0


def _load(args):
    return jllm.load(args.model, args.dtype, quantize=args.quantize, group_size=args.group_size,
                     attn_impl=args.attn_impl, mesh=_mesh(args), progress=_main_process(),
                     kv_cache_dtype=_kv_cache_dtype(args.kv_cache))


def _print_stats(results) -> None:
    if not _main_process():
        return
    for i, r in enumerate(results):
        s = r.stats
        extra = [f"compiling took {s.compile_s:.1f} s (not counted above)"] if s.compile_s > 0 else []
        if speculative.format_stats(s):
            extra.append(speculative.format_stats(s))
        print(f"[{i}] prompt {s.prompt_tokens} tokens, generated {s.generated_tokens} "
              f"({r.finish_reason}), TTFT {s.ttft_s * 1e3:.1f} ms, decode {s.decode_tokens_per_s:.1f} tokens/s"
              + "".join(f"; {e}" for e in extra), file=sys.stderr)


def _add_speculation(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("speculative decoding", "--speculate K with one proposer: a draft model, "
                             "the model's own quantized copy, or prompt lookup")
    g.add_argument("--speculate", type=positive_int, default=None, metavar="K",
                   help="tokens drafted and verified per target step")
    g.add_argument("--draft", default=None, metavar="DIR", help="a draft checkpoint with the same tokenizer")
    g.add_argument("--draft-quantize", choices=["int8", "int4"], default=None,
                   help="draft with the model's own weights quantized in memory")
    g.add_argument("--prompt-lookup", type=positive_int, default=None, metavar="N",
                   help="draft the tokens that followed the longest earlier n-gram (n <= N)")


def _check_speculation(args) -> None:
    """--speculate with exactly one proposer, checked before anything loads."""
    if not hasattr(args, "speculate"):
        return
    # `jllm serve` takes --speculate with --prompt-lookup only (the engine's proposer)
    draft, draft_quantize = getattr(args, "draft", None), getattr(args, "draft_quantize", None)
    given = [f for f, v in (("--draft", draft), ("--draft-quantize", draft_quantize),
                            ("--prompt-lookup", args.prompt_lookup)) if v is not None]
    if args.speculate is None and given:
        raise ValueError(f"{', '.join(given)} needs --speculate K")
    if args.speculate is not None and len(given) != 1:
        raise ValueError(f"--speculate {args.speculate} needs exactly one of --draft, --draft-quantize, "
                         f"--prompt-lookup; got {', '.join(given) or 'none'}")
    if args.speculate is not None and (getattr(args, "tp", 1) > 1 or getattr(args, "dp", 1) > 1):
        raise ValueError(f"--speculate runs on one device; got --tp {args.tp} --dp {args.dp}")
    if args.speculate is not None and (getattr(args, "presence_penalty", 0) or getattr(args, "frequency_penalty", 0)
                                       or getattr(args, "repetition_penalty", 1) != 1
                                       or getattr(args, "logit_bias", None)):
        raise ValueError("--presence-penalty, --frequency-penalty, --repetition-penalty and --logit-bias do "
                         "not combine with --speculate")
    if args.speculate is not None and getattr(args, "logprobs", None) is not None:
        raise ValueError("--logprobs does not combine with --speculate")
    if args.speculate is not None and _guided(args) is not None:
        raise ValueError("--json-schema, --json-object, --regex and --grammar do not combine with --speculate")
    if draft is not None and not os.path.isdir(os.path.expanduser(draft)):
        raise FileNotFoundError(f"--draft {draft!r} is not a directory (a jllm checkpoint)")
    if draft_quantize is not None and getattr(args, "quantize", None) is not None:
        raise ValueError(f"--draft-quantize {draft_quantize} quantizes a float target's own weights; "
                         f"the target is already --quantize {args.quantize}")


def _penalties(args) -> dict:
    bias = {}
    for tid, b in args.logit_bias or ():
        if tid in bias:
            raise ValueError(f"--logit-bias names token {tid} twice ({bias[tid]:g} and {b:g})")
        bias[tid] = b
    return dict(presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
                repetition_penalty=args.repetition_penalty, logit_bias=bias or None)


def _speculative(args, model):
    """The Speculative the flags ask for, or None."""
    return speculative.from_args(model, args.speculate, draft=args.draft and os.path.expanduser(args.draft),
                                 draft_quantize=args.draft_quantize, prompt_lookup=args.prompt_lookup)


def cmd_generate(args) -> int:
    model = _load(args)
    prompt = args.prompt
    if model.tokenizer is None:
        try:
            prompt = [int(t) for t in args.prompt.split()]
        except ValueError:
            sys.exit("this model has no tokenizer: pass --prompt as space-separated token ids")

    echoed = False

    def echo():  # the prompt, once generate has checked the arguments: an error keeps its own line
        nonlocal echoed
        if not echoed:
            sys.stdout.write(args.prompt if model.tokenizer is not None else "")
            echoed = True

    def stream(delta):
        echo()
        sys.stdout.write(delta.text if model.tokenizer is not None
                         else "".join(f" {t}" for t in delta.token_ids))
        sys.stdout.flush()

    main = _main_process()
    spec = _speculative(args, model)
    if main:
        say("preparing prefill and decode (compiled on first use of a shape, then cached on disk)")
    lp = {} if args.logprobs is None else dict(logprobs=args.logprobs)
    guided = _guided(args)
    if guided is not None:
        lp["guided"] = guided
    results = jllm.generate(model, [prompt], max_new_tokens=args.max_new_tokens,
                            temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                            seed=args.seed, stop=args.stop, stream=stream if main else None,
                            speculative=spec, **_penalties(args), **lp)
    if main:
        echo()  # a reply with no text streams nothing
        print()
    _print_stats(results)
    if main and args.logprobs is not None:
        _print_logprobs(model, prompt, results[0])
    return 0


def _guided(args):
    """The Guided the structured-output flags ask for, or None (ValueError naming a bad file)."""
    from jllm.guided import Guided
    if getattr(args, "json_object", False):
        return Guided.json_object()
    if getattr(args, "regex", None) is not None:
        return Guided.regex(args.regex)
    for flag, path in (("--json-schema", getattr(args, "json_schema", None)),
                       ("--grammar", getattr(args, "grammar", None))):
        if path is None:
            continue
        try:
            with open(os.path.expanduser(path), encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"{flag} {path!r}: cannot read it: {e}") from None
        if flag == "--grammar":
            return Guided.lark(text)
        try:
            return Guided.json_schema(text)
        except (ValueError, TypeError) as e:
            raise ValueError(f"{flag} {path!r}: {e}") from None
    return None


def _print_logprobs(model: Model, prompt, out) -> None:
    """One line per generated token (and a stop token): its place, text, log-probability, and the
    most likely tokens there with theirs. Text as it reads after the token before (repr)."""
    tok = model.tokenizer
    ids = tok.encode(prompt, bos=True) if isinstance(prompt, str) else prompt

    def show(prev: int, t: int) -> str:
        return repr(tok.decode_after(prev, [t])) if tok is not None else str(t)

    print("token logprobs (position, token, logprob | most likely there):", file=sys.stderr)
    prev = ids[-1]
    for i, (t, lp, top) in enumerate(out.logprobs):
        alts = ", ".join(f"{show(prev, a)} {v:.3f}" for a, v in top)
        print(f"{i:5d} {show(prev, t):>16} {lp:9.4f}" + (f" | {alts}" if alts else ""), file=sys.stderr)
        prev = t


def _read_line() -> str:
    """The next user line; in a multi-process run process 0 reads it and sends it to the others.

    Ctrl-D reads as /exit and Ctrl-C as _INTERRUPT (after ending the prompt's line); a line that
    is not valid UTF-8 is refused with a message and the prompt shown again.
    """
    line = None
    while _main_process() and line is None:
        try:
            line = input("> ").strip()
        except EOFError:
            print()
            line = "/exit"
        except KeyboardInterrupt:
            print()
            line = _INTERRUPT
        except UnicodeDecodeError as e:  # stdin that could not be set to surrogateescape
            say(f"(not sent: the line is not valid UTF-8: {e}; the conversation is kept)")
            continue
        problem = _utf8_problem(line)
        if problem:
            say(f"(not sent: {problem}; the conversation is kept)")
            line = None
    if jax.process_count() > 1:
        line = parallel.broadcast_text(line)
    return line


def _reply(model, ids, args, max_new_tokens: int, spec, seed: int):
    """Generate and stream one chat reply -> (Completion or None if Ctrl-C stopped it, its text)."""
    main, parts = _main_process(), []

    def stream(delta):
        parts.append(delta.text)
        if main:
            sys.stdout.write(delta.text)
            sys.stdout.flush()

    try:
        [out] = jllm.generate(model, [ids], max_new_tokens=max_new_tokens,
                              temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
                              seed=seed, stop=args.stop, stream=stream, speculative=spec, **_penalties(args))
    except KeyboardInterrupt:
        if jax.process_count() > 1:  # the other processes cannot be told mid-reply: end the run
            raise
        print()
        say("(reply stopped)")
        return None, "".join(parts)
    if main:
        print()
    return out, out.text


def cmd_chat(args) -> int:
    # Bytes typed that are not UTF-8 then arrive as lone surrogates that _read_line reports,
    # instead of an exception that loses the line (and, from a pipe, the lines read with it).
    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="surrogateescape")
    # --chat-template, else the checkpoint's (tokenizer_config.json), else Llama-2's format; a broken
    # template fails before the load.
    model_dir = os.path.expanduser(args.model)
    source = chat.template_source(model_dir, args.chat_template)
    if source is not None:
        chat.compile_template(source)
    model = _load(args)
    if model.tokenizer is None:
        sys.exit("chat needs a model with a tokenizer (tokenizer.model or tokenizer.json)")
    spec = _speculative(args, model)
    template = None if source is None else chat.ChatTemplate(source, model.tokenizer)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if args.system:  # with a one-word message and a one-token reply it must still fit
        n = len(chat.chat_ids(messages + [{"role": "user", "content": "hi"}], model.tokenizer, template))
        if n >= model.cfg.max_seq_len:
            raise ValueError(f"--system takes {n} of the model's {model.cfg.max_seq_len} tokens of context "
                             f"with a one-word message: no room to reply; shorten it")
    last = None
    say(f"jllm chat: {CHAT_HELP}")
    while True:
        line = _read_line()
        if line in ("/exit", "/quit"):
            return 0
        if line == _INTERRUPT:
            return 130
        if line == "/help":
            say(CHAT_HELP)
        elif line == "/reset":
            messages = messages[:1] if args.system else []
            say("(conversation cleared)")
        elif line == "/stats" and last is None:
            say("(no reply yet)")
        elif line == "/stats":
            s = last.stats
            say(f"prefill: {s.prompt_tokens} tokens in {s.ttft_s * 1e3:.1f} ms "
                f"({s.prompt_tokens / max(s.ttft_s, 1e-9):.1f} tokens/s); decode: "
                f"{s.generated_tokens} tokens at {s.decode_tokens_per_s:.1f} tokens/s"
                + (f"; {speculative.format_stats(s)}" if speculative.format_stats(s) else "")
                + (f"; compiling took {s.compile_s:.1f} s" if s.compile_s > 0 else ""))
        elif line.startswith("/") and not line.startswith("//"):
            say(f"unknown command {line.split()[0]!r}; {CHAT_HELP}")
        elif line:  # a message; "//..." sends "/..."
            messages.append({"role": "user", "content": line.removeprefix("/")})
            try:
                ids = chat.chat_ids(messages, model.tokenizer, template)
            except ValueError as e:  # the checkpoint's template refused the conversation
                messages.pop()
                say(f"(not sent: {e})")
                continue
            room = model.cfg.max_seq_len - len(ids)
            if room < 1:
                messages.pop()
                say(f"(the conversation has {len(ids)} tokens, the model's context is "
                    f"{model.cfg.max_seq_len}: /reset to start over)")
                continue
            # Each reply of a conversation samples from its own seed (the same ones after /reset).
            turn = sum(m["role"] == "assistant" for m in messages)
            out, text = _reply(model, ids, args, min(args.max_new_tokens, room), spec,
                               seed=(args.seed + turn) % 2**32)
            last = out or last
            # A stopped reply stays in the conversation as far as it got (perhaps empty).
            messages.append({"role": "assistant", "content": text})


def cmd_convert(args) -> int:
    hf.convert(args.hf_dir, args.out_dir, dtype=args.dtype, overwrite=args.overwrite,
               quantize=args.quantize, group_size=args.group_size)
    print(f"wrote {args.out_dir}", file=sys.stderr)
    return 0


def _check_bench(args, cfg) -> None:
    """What would otherwise fail only after the weights are made, or after the whole run."""
    for prompt_len in args.prompt_len:
        if prompt_len + args.new_tokens > cfg.max_seq_len:
            raise ValueError(f"--prompt-len {prompt_len} + --new-tokens {args.new_tokens} = "
                             f"{prompt_len + args.new_tokens} positions do not fit {args.config}'s "
                             f"context of {cfg.max_seq_len} (max_seq_len)")
    for batch in args.batch:
        if batch % args.dp:
            raise ValueError(f"--batch {batch} is not a multiple of --dp {args.dp}")
    _check_outputs(args, writes=args.process_id in (None, 0))  # only process 0 writes them


def _check_outputs(args, writes: bool = True) -> None:
    """That --plot has matplotlib and, where this process `writes` them, that the files of --json
    and --plot can be created."""
    if args.plot:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError as e:
            raise ValueError(f"--plot needs matplotlib ({e}): pip install 'jllm[bench]'") from None
        ext = os.path.splitext(args.plot)[1][1:].lower()
        formats = FigureCanvasBase.get_supported_filetypes()
        if ext and ext not in formats:
            raise ValueError(f"--plot {args.plot!r}: matplotlib cannot write .{ext} files; name one of "
                             f"{', '.join(sorted(formats))} (or no extension, for PNG)")
    for flag, path in (("--json", args.json), ("--plot", args.plot)):
        if path and writes:
            _check_writable(flag, path)


def _check_writable(flag: str, path: str) -> None:
    """Raise ValueError naming `path` unless a file can be created there (tried, then removed)."""
    if os.path.isdir(path):
        raise ValueError(f"{flag} {path!r} is a directory; expected a file name")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".jllm-write-check-"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path!r} cannot be written: {e.strerror} ({folder!r})") from None


def cmd_bench(args) -> int:
    cfg = LlamaConfig.from_name(args.config)
    _check_bench(args, cfg)
    prefill_options = xla_options(args.prefill_xla_option)
    mesh = _mesh(args)  # with several processes, each runs the same benchmark on its devices
    # A fresh cache directory, so "cold" is a real first compile and "warm" a persistent-cache hit.
    with tempfile.TemporaryDirectory() as cache_dir, (
            runtime.compilation_cache(args.cache_dir or cache_dir)
            if os.environ.get("JLLM_CACHE_DIR") != "off" else contextlib.nullcontext()):
        results = []
        # On a mesh the weights are made in their shards: a 70B model never sits on one device.
        say(f"initializing random {args.config} weights ({args.dtype})"
            + (" in shards" if mesh is not None else f" on {jax.devices()[0].device_kind}"))
        params = parallel.random_params(cfg, mesh, jax.random.key(0), args.dtype,
                                        quantize=args.quantize, group_size=args.group_size)
        for attn_impl, matmul_impl, kv_cache, prompt_len, batch in itertools.product(
                args.attn_impl, args.matmul_impl, args.kv_cache, args.prompt_len, args.batch):
            with parallel.mesh_context(mesh):
                r = bench.run(cfg, args.config, dtype=args.dtype, batch=batch, prompt_len=prompt_len,
                              new_tokens=args.new_tokens, attn_impl=attn_impl,
                              matmul_impl=matmul_impl, kv_cache_dtype=_kv_cache_dtype(kv_cache),
                              prefill_compiler_options=prefill_options,
                              warm_compile=args.warm_compile and not results,
                              bandwidth=args.bandwidth, peak_tflops=args.peak_tflops, params=params,
                              mesh=mesh)
            args.bandwidth, args.peak_tflops = r.bandwidth_tb_s, r.peak_tflops  # measure once
            results.append(r)
            say(bench.format_table([r]).splitlines()[-1])
        if args.speculate:
            model = Model(params=params, cfg=cfg, attn_impl=args.attn_impl[0] or default_attn_impl(),
                          matmul_impl=args.matmul_impl[0] or default_matmul_impl(), quant=args.quantize)
            for prompt_len in args.prompt_len:
                r = bench.speculative(model, _speculative(args, model), prompt_len, args.new_tokens)
                say(f"speculative k={r['k']} prompt {prompt_len}: {r['speculative_tok_s']:.1f} tok/s against "
                    f"{r['plain_tok_s']:.1f} plain ({r['speedup']:.2f}x), {r['stats']}, same tokens: {r['same_tokens']}")
    if not _main_process():
        return 0
    print(bench.format_table(results))
    print(f"device {results[0].device}, jax {results[0].jax_version}, bandwidth "
          f"{results[0].bandwidth_tb_s:.2f} TB/s, peak {results[0].peak_tflops:.1f} TFLOP/s, weights "
          f"{results[0].weight_gb:.2f} GB, peak memory {results[-1].peak_memory_gb or 0:.2f} GB"
          + (f", prefill XLA options {results[0].prefill_compiler_options}"
             if results[0].prefill_compiler_options else ""))
    if args.json:
        _write_json(args.json, [_finite_or_none(r.__dict__) for r in results])
    if args.plot:
        bench.plot(results, args.plot)
    return 0


def _finite_or_none(x):
    """JSON for strict parsers: NaN and infinities (no measurement) become null."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):  # a BenchResult's fields, and its prefill_compiler_options
        return {k: _finite_or_none(v) for k, v in x.items()}
    return x


def _write_json(path: str, obj) -> None:
    text = json.dumps(obj, indent=2, allow_nan=False)
    runtime.write_atomic(path, lambda tmp: pathlib.Path(tmp).write_text(text))


def xla_options(items: list[str]) -> dict | None:
    """["key=value", ...] -> {key: bool | int | float | str}, or None for none."""
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"XLA option {item!r}: expected KEY=VALUE")
        out[key] = _xla_value(value)
    return out or None


def _xla_value(value: str) -> bool | int | float | str:
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    for kind in (int, float):
        with contextlib.suppress(ValueError):
            return kind(value)
    return value


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="jllm", description="Llama-2 inference in JAX")
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("generate", help="complete a prompt, streaming to stdout")
    _add_model(p)
    p.add_argument("--prompt", type=_text, required=True,
                   help="text (UTF-8), or space-separated token ids for a model without a tokenizer")
    _add_sampling(p)
    p.add_argument("--logprobs", type=argtypes.logprobs, default=None, metavar="N",
                   help="after the output, print each token's log-probability and the N (0-20) most "
                        "likely tokens at its place (to stderr)")
    g = p.add_argument_group("structured output", "the output must match (one of these; needs llguidance)")
    g = g.add_mutually_exclusive_group()
    g.add_argument("--json-schema", metavar="FILE", help="a JSON schema in this file")
    g.add_argument("--json-object", action="store_true", help="any JSON object")
    g.add_argument("--regex", type=_text, metavar="PATTERN", help="this regular expression, whole")
    g.add_argument("--grammar", metavar="FILE", help="the Lark grammar in this file (its rule `start`)")
    _add_speculation(p)
    _add_parallel(p)
    p.set_defaults(fn=cmd_generate)
    p = sub.add_parser("chat", help="interactive chat (the checkpoint's chat template, else Llama-2's format)")
    _add_model(p)
    p.add_argument("--system", type=_text, default=None, help="system prompt")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a jinja2 chat template (a file, or the template itself) instead of the checkpoint's")
    _add_sampling(p)
    _add_speculation(p)
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
    p.add_argument("--config", default="llama-2-7b",
                   help=f"a named config: {', '.join(CONFIGS)} (default llama-2-7b)")
    p.add_argument("--random-weights", action="store_true",
                   help="accepted and changes nothing: random weights of a named config are the "
                        "only mode (nothing is downloaded or read)")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    _add_quant(p)
    p.add_argument("--batch", type=positive_int, nargs="+", default=[1])
    p.add_argument("--prompt-len", type=positive_int, nargs="+", default=[128],
                   help="prompt length(s); with --new-tokens within the config's max_seq_len")
    p.add_argument("--new-tokens", type=positive_int, default=128)
    p.add_argument("--attn-impl", choices=["xla", "pallas"], nargs="+", default=[None])
    p.add_argument("--matmul-impl", choices=["xla", "pallas", "pallas-fused"], nargs="+", default=[None],
                   help="quantized matmul: the Pallas kernel, the kernel with one launch for q/k/v and "
                        "for gate/up (pallas-fused), or XLA (default: pallas-fused on GPU)")
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, nargs="+", default=["auto"],
                   help="KV cache dtype(s) to run: auto (the weights') and/or int8")
    p.add_argument("--prefill-xla-option", action="append", default=[], metavar="KEY=VALUE",
                   help="an XLA option for the prefill program only, e.g. "
                        "xla_gpu_enable_triton_gemm=true (float weights' prefill sets it false; repeatable)")
    p.add_argument("--bandwidth", type=positive_float, default=None, help="TB/s for MBU (default: measured)")
    p.add_argument("--peak-tflops", type=positive_float, default=None, help="for MFU (default: measured)")
    p.add_argument("--cache-dir", default=None, help="persistent compilation cache (default: a fresh temporary one)")
    p.add_argument("--warm-compile", action=argparse.BooleanOptionalAction, default=True,
                   help="also time a second compile served by the persistent cache (first run only)")
    p.add_argument("--json", default=None, help="write results to this file (a skipped "
                   "measurement, such as the warm compile with --no-warm-compile, is null)")
    p.add_argument("--plot", default=None, help="write a PNG of tokens/s against batch (needs "
                   "matplotlib: pip install 'jllm[bench]')")
    _add_parallel(p)
    _add_speculation(p)
    p.set_defaults(fn=cmd_bench)
    modes = p.add_subparsers(dest="bench_mode", metavar="{engine,serve}", required=False,
                             help="other benchmarks (default: the model's prefill and decode)")
    e = modes.add_parser("engine", help="offline engine throughput: N requests at once, against "
                         "static batches of generate")
    _add_engine_bench(e)
    e.set_defaults(fn=cmd_bench_engine)
    s = modes.add_parser("serve", help="a load generator against an OpenAI-compatible URL")
    from jllm.serve import loadgen
    loadgen.add_arguments(s)
    s.set_defaults(fn=loadgen.run_cli)
    p = sub.add_parser("serve", help="OpenAI-compatible HTTP server (needs the [serve] extra)")
    from jllm.serve import cli as serve_cli
    serve_cli.add_arguments(p)
    p.set_defaults(fn=serve_cli.run)
    return ap


def _add_engine_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default="llama-2-7b", choices=sorted(CONFIGS),
                   help="a named config; random weights")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    _add_quant(p)
    p.add_argument("--kv-cache", choices=KV_CACHE_CHOICES, default="auto")
    p.add_argument("--requests", type=positive_int, default=1000)
    p.add_argument("--prompt-len", type=positive_int, nargs=2, default=[64, 1024], metavar=("LO", "HI"),
                   help="prompt lengths uniform in [LO, HI]")
    p.add_argument("--output-len", type=positive_int, nargs=2, default=[64, 512], metavar=("LO", "HI"),
                   help="output lengths uniform in [LO, HI] (no stop tokens)")
    p.add_argument("--max-seqs", type=positive_int, default=256)
    p.add_argument("--max-tokens-per-step", type=positive_int, default=1024,
                   help="tokens per engine step (default 1024: offline, prompts fill 3/4 of a step "
                        "with 256 decodes; the Engine and jllm serve default to 512 for latency)")
    p.add_argument("--max-prompts-per-step", type=positive_int, default=4, metavar="N",
                   help="prompts one step may take chunks of (default 4, the Engine's)")
    p.add_argument("--page-size", type=positive_int, default=16)
    p.add_argument("--num-pages", type=positive_int, default=None)
    p.add_argument("--compile-workers", type=positive_int, default=None, metavar="N",
                   help="compile the step programs N at a time in threads (default 8 on a GPU, "
                        "at most the CPU count; 1 elsewhere)")
    p.add_argument("--device-memory-fraction", type=probability, default=0.9, help=argtypes.DEVICE_MEMORY_HELP)
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also time the same requests through generate in static batches of 64")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="write the result here")
    p.add_argument("--plot", default=None, help="write a PNG of running requests and tokens/s over time")


def cmd_bench_engine(args) -> int:
    runtime.set_device_memory_fraction(args.device_memory_fraction)  # before the first device use
    from jllm.engine.bench import format_result, run_engine_bench
    cfg = LlamaConfig.from_name(args.config)
    if args.prompt_len[0] > args.prompt_len[1] or args.output_len[0] > args.output_len[1]:
        raise ValueError(f"--prompt-len {args.prompt_len} and --output-len {args.output_len}: LO must be <= HI")
    _check_outputs(args)
    say(f"initializing random {args.config} weights ({args.dtype})")
    params = parallel.random_params(cfg, None, jax.random.key(args.seed), args.dtype,
                                    quantize=args.quantize, group_size=args.group_size)
    model = Model(params=params, cfg=cfg, quant=args.quantize, attn_impl=default_attn_impl(),
                  matmul_impl=default_matmul_impl())
    kw = dict(max_seqs=args.max_seqs, max_tokens_per_step=args.max_tokens_per_step, page_size=args.page_size,
              num_pages=args.num_pages, kv_cache_dtype=_kv_cache_dtype(args.kv_cache),
              max_model_len=args.prompt_len[1] + args.output_len[1], max_prompts_per_step=args.max_prompts_per_step,
              compile_workers=args.compile_workers)
    r = run_engine_bench(model, n_requests=args.requests, prompt_len=tuple(args.prompt_len),
                         output_len=tuple(args.output_len), seed=args.seed, baseline=args.baseline,
                         plot=args.plot, engine_kwargs=kw)
    print(format_result(r))
    if args.json:
        _write_json(args.json, dataclasses.asdict(r))
    return 0


def _check(args) -> None:
    """Checks of several flags together, made before anything loads (ValueError naming them)."""
    group_size, quantize = getattr(args, "group_size", None), getattr(args, "quantize", None)
    if group_size is not None and quantize != "int4":
        raise ValueError(f"--group-size {group_size} applies to --quantize int4 only "
                         f"(got --quantize {quantize})")
    _check_speculation(args)
    _guided(args)   # a structured-output file that cannot be read or is not JSON: before loading
    model = getattr(args, "model", None)  # `jllm bench serve --model` names the served model instead
    if model is not None and args.command != "bench" and not os.path.isdir(os.path.expanduser(model)):
        raise FileNotFoundError(f"--model {model!r} is not a directory (a jllm checkpoint or a "
                                "Hugging Face Llama directory)")
    num, pid = getattr(args, "num_processes", None), getattr(args, "process_id", None)
    if num is not None and pid is not None and pid >= num:
        raise ValueError(f"--process-id {pid} must be below --num-processes {num}")


def _quiet_stdout() -> None:
    """After a broken pipe (`jllm generate ... | head`): send what is left for stdout to devnull,
    so the flush at exit does not fail again (the Python docs' recipe, signal module, SIGPIPE)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # a replaced stdout (tests) has no descriptor
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, fd)
    os.close(devnull)


def _bench_mode_misplaced(argv: list[str], mode: str) -> list[str]:
    """The options written between `bench` and its mode (`engine`, `serve`): the mode parses its
    own, so those would be dropped without a word."""
    start = argv.index("bench") + 1
    end = argv.index(mode, start)
    return [a for a in argv[start:end] if a.startswith("-")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    with contextlib.suppress(AttributeError, ValueError):  # a replaced stdout (tests) may not reconfigure
        sys.stdout.reconfigure(errors="replace")  # a character the terminal lacks is shown, not fatal
    args = parser().parse_args(argv)
    if getattr(args, "bench_mode", None):
        misplaced = _bench_mode_misplaced(argv, args.bench_mode)
        if misplaced:
            print(f"jllm bench: error: {' '.join(misplaced)} before {args.bench_mode!r} would be ignored: "
                  f"`jllm bench {args.bench_mode}` takes its own options after it "
                  f"(jllm bench {args.bench_mode} --help)", file=sys.stderr)
            return 2
    try:
        _check(args)
        status = args.fn(args)
        sys.stdout.flush()  # a reader that went away shows up here, not at exit
        return status
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as e:
        print(f"jllm {args.command}: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except OSError as e:  # a full disk, a permission: what the system said, not a traceback
        print(f"jllm {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: end the line being written, exit with 128 + SIGINT
        print()
        return 130


if __name__ == "__main__":
    sys.exit(main())
