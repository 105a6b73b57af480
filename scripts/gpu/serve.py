"""`jllm serve` under load on random weights: the server in this process (a thread), the load
generator against it, and the engine's own offline throughput on the same requests for scale.

    PYTHONPATH=. python3 -m scripts.gpu serve [--config llama-2-7b] [--requests 256]
        [--input-len 512] [--output-len 256] [--rates 4 8 16 inf] [--concurrency 8] [--out DIR]

The model has no tokenizer (random weights), so prompts are random token ids and completions come
back as token ids; every request runs to --output-len tokens (ignore_eos). --json-share F asks that
share of the requests for a JSON object (guided decoding: needs llguidance and a tokenizer, a
Llama-3-style byte-level BPE trained here on local text, `convert.tiny.train_bpe_tokenizer`; a
guided reply ends when its object is complete, at the latest at --output-len).
"""
import argparse
import json
import math
import os
import threading
import time


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu serve", description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="llama-2-7b")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--input-len", type=int, default=512)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--rates", type=float, nargs="+", default=[4.0, 8.0, 16.0, math.inf])
    ap.add_argument("--concurrency", type=int, nargs="+", default=[8])
    ap.add_argument("--max-seqs", type=int, default=256)
    ap.add_argument("--max-tokens-per-step", type=int, default=512)
    ap.add_argument("--max-model-len", type=int, default=None, help="default input + output + 8")
    ap.add_argument("--decode-buckets", type=int, nargs="*")
    ap.add_argument("--chunk-buckets", type=int, nargs="*")
    ap.add_argument("--max-duration", type=float, default=120.0, help="wall-clock limit per load point")
    ap.add_argument("--json-share", type=float, default=0.0, help="share of requests asking for a JSON object")
    ap.add_argument("--out", default=".")
    args = ap.parse_args(argv)

    import jax

    from jllm import parallel, runtime
    from jllm.config import LlamaConfig
    from jllm.engine import Engine, SamplingParams
    from jllm.generate import Model
    from jllm.serve import loadgen
    from jllm.serve.app import create_app
    from jllm.serve.main import bind, make_server
    from jllm.serve.runner import EngineRunner

    runtime.enable_compilation_cache()  # shapes the engine part compiled are reused
    cfg = LlamaConfig.from_name(args.config)
    tokenizer = None
    if args.json_share:   # guided decoding needs a tokenizer: Llama-3's kind, trained on local text
        from convert.tiny import train_bpe_tokenizer
        from jllm.tokenizer import open_tokenizer
        tok_dir = os.path.join(args.out, "bpe_tokenizer")
        train_bpe_tokenizer(tok_dir, min(cfg.vocab_size, 4096))
        tokenizer = open_tokenizer(os.path.join(tok_dir, "tokenizer.json"))
    model = Model(params=parallel.random_params(cfg, None, jax.random.key(0)), cfg=cfg, tokenizer=tokenizer,
                  attn_impl="pallas", matmul_impl="pallas-fused")
    kw = dict(max_seqs=args.max_seqs, max_tokens_per_step=args.max_tokens_per_step,
              max_model_len=args.max_model_len or args.input_len + args.output_len + 8,
              decode_buckets=args.decode_buckets or None, chunk_buckets=args.chunk_buckets or None)
    engine = Engine(model, **kw)
    if args.json_share:
        engine.prepare_guided()
    report: dict = {"args": vars(args)}

    # The engine alone on the same shape of requests: the ceiling the server is held to.
    lcfg = loadgen.LoadConfig(url="", model="random", num_prompts=args.requests, input_len=args.input_len,
                              output_len=args.output_len, vocab_size=cfg.vocab_size, ignore_eos=True)
    prompts = loadgen.make_prompts(lcfg)
    sp = SamplingParams(max_tokens=args.output_len, stop_token_ids=())
    engine.generate(prompts[:8], sp)  # warm the host paths
    t = time.perf_counter()
    outs = engine.generate(prompts, sp)
    offline = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - t)
    report["engine_offline_output_tok_s"] = offline
    print(f"engine offline: {offline:,.0f} output tok/s ({len(prompts)} requests)", flush=True)

    sock = bind("127.0.0.1", 0)
    runner = EngineRunner(engine)
    app = create_app(runner, "random", cfg=cfg, tokenizer=tokenizer)
    server = make_server(app, sock, shutdown_timeout=5)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        port = sock.getsockname()[1]
        for _ in range(600):  # bounded: the server starts in well under a minute
            if server.started:
                break
            time.sleep(0.1)
        lcfg = loadgen.LoadConfig(url=f"http://127.0.0.1:{port}", model="random", num_prompts=args.requests,
                                  input_len=args.input_len, output_len=args.output_len,
                                  vocab_size=min(cfg.vocab_size, tokenizer.vocab_size) if tokenizer else cfg.vocab_size,
                                  ignore_eos=True, max_duration_s=args.max_duration, json_share=args.json_share)
        said = lambda line: print(line, flush=True)  # noqa: E731
        rates = loadgen.run(lcfg, args.rates, None, progress=said)
        conc = loadgen.run(lcfg, None, args.concurrency, progress=said)
        report["rates"], report["concurrency"] = rates, conc
        loadgen.plot(rates, os.path.join(args.out, "serve_latency.png"))
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
    with open(os.path.join(args.out, "serve.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    return 0
