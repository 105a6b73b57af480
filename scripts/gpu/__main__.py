"""python -m scripts.gpu PART [options]: run one GPU benchmark, sweep or profiling region.

Run from the repository root (the GPU machine has no package index, so jllm is not installed
there): `PYTHONPATH=. python3 -m scripts.gpu decode-attention --tune`.
"""
import argparse
import importlib
import sys

# PART -> (module under scripts.gpu, function, one line of help)
PARTS = {
    "decode-attention": ("attention", "decode", "decode_attention vs XLA, bf16 and int8 cache"),
    "paged-attention": ("attention", "paged", "paged_attention vs decode_attention, bf16 and int8 pages"),
    "paged-prefill": ("attention", "paged_prefill", "paged_attention_mq chunks vs flash_attention, bf16 pages"),
    "int4-prefill": ("gemv", "int4_prefill", "int4 at prefill sizes: XLA against the kernel's tilings, TTFT"),
    "flash-attention": ("flash", "flash", "flash_attention vs XLA and cuDNN, causal prefill"),
    "quant-matmul": ("gemv", "quant_matmul", "quantized matmul per call, one 7B layer, batch 1/8/64"),
    "gemv": ("gemv", "gemv", "quantized GEMV variants in an on-device loop"),
    "gemv-multi": ("gemv", "gemv_multi", "q/k/v and gate/up: one quant_matmul_multi vs one call each"),
    "bf16-e2e": ("gemv", "bf16_e2e", "7B bf16 decode with the Pallas bf16 GEMV vs XLA's"),
    "gemv-one": ("profile", "gemv_one", "one quantized GEMV between cuProfilerStart/Stop (for ncu)"),
    "prefill": ("profile", "prefill", "one model prefill between cuProfilerStart/Stop (for ncu)"),
    "ncu-summary": ("profile", "ncu_summary", "time per kernel name from an ncu CSV"),
    "allreduce": ("allreduce", "allreduce", "TP decode pattern: GEMVs and all-reduce on all GPUs"),
    "hlo": ("hlo", "hlo", "cache copies and kernels per decode step in the optimized HLO"),
    "step-profile": ("step_profile", "main", "a decode step's kernel table from a jax.profiler trace"),
    "speculative": ("speculative_bench", "main", "self-drafted speculative decoding: speed-up and the cost model"),
    "serve": ("serve", "main", "jllm serve on random weights under the load generator, with the engine offline"),
    "engine": ("engine", "main", "the engine against generate on the tiny model, then the offline benchmark"),
    "stream": ("stream", "main", "read bandwidth of a Pallas kernel by tile shape and weight layout"),
    "ttft": ("ttft", "main", "one prefill's TTFT on the host: cache, dispatch, wait"),
    "l2": ("l2", "main", "a GEMV right after its weight was read: what an L2 prefetch could save"),
    "tma": ("tma", "main", "Mosaic GPU TMA pipelines: read rate and a wgmma bf16 GEMV against the tree's"),
}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m scripts.gpu", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="part", required=True, metavar="PART")
    parts = {name: sub.add_parser(name, help=help_) for name, (_, _, help_) in PARTS.items()}
    for name in ("decode-attention", "paged-attention", "paged-prefill", "flash-attention"):
        parts[name].add_argument("--tune", action="store_true", help="also sweep some BlockSizes")
    for name in ("decode-attention", "paged-attention"):
        parts[name].add_argument("--loop", action="store_true",
                                 help="time the kernels in an on-device loop (timing.loop_time_us), below "
                                      "the dispatch floor of the default timer")
    parts["flash-attention"].add_argument(
        "--shape", type=int, nargs=5, metavar=("B", "T", "H", "G", "K"),
        help="only this shape (with --tune, a wider sweep)")
    parts["decode-attention"].add_argument(
        "--shape", type=int, nargs=3, metavar=("B", "S", "L"),
        help="only B rows of L keys in a cache of S (32 heads; with --tune, stages, blocks and warps)")
    parts["paged-attention"].add_argument(
        "--shape", type=int, nargs=2, metavar=("B", "S"),
        help="only this batch and length (pages of 16; with --tune, a wider sweep)")
    parts["paged-attention"].add_argument("--kv-heads", type=int, choices=[1, 2, 4, 8, 16, 32], default=32,
                                          help="KV heads of 32 query heads (8: Llama-3.x's GQA; default 32)")
    parts["paged-attention"].add_argument("--cache", nargs="+", choices=["bf16", "int8"], default=["bf16", "int8"],
                                          help="page types (default both)")
    variants = importlib.import_module("scripts.gpu.gemv").VARIANTS
    p = parts["quant-matmul"]
    p.add_argument("--m", type=int, nargs="+", default=[1, 8, 64], help="batch rows")
    p.add_argument("--sweep", nargs="+", choices=list(variants), default=[],
                   help="first sweep these variants over the shapes at batch 1 and 8, int8 and int4")
    for name in ("gemv", "gemv-multi", "gemv-one"):
        p = parts[name]
        p.add_argument("--bits", type=int, nargs="+", default=[8, 4] if name != "gemv-multi" else [8, 4, 16])
        p.add_argument("--m", type=int, nargs="+", default=[1, 8] if name != "gemv-one" else [1])
    p = parts["int4-prefill"]
    p.add_argument("--m", type=int, nargs="+", default=[128, 512, 2048], help="rows of x (prompt tokens)")
    p.add_argument("--bench", type=int, nargs="*", metavar="PROMPT_LEN",
                   help="then jllm bench TTFT at these prompt lengths per prefill path")
    parts["gemv"].add_argument("--variants", nargs="+", choices=list(variants), help="only these")
    parts["gemv-one"].add_argument("--variant", default="default", choices=list(variants))
    p = parts["bf16-e2e"]
    p.add_argument("--variants", nargs="+", default=["default"], choices=list(variants),
                   help="bits=16 tilings to run end to end (default: the tree's)")
    p.add_argument("--single", action="store_true", help="each also with o and down through the kernel")
    p.add_argument("--batch", type=int, default=1)
    parts["gemv-one"].add_argument("--k", type=int, default=4096)
    parts["gemv-one"].add_argument("--n", type=int, default=22016)
    parts["l2"].add_argument("--bits", type=int, nargs="+", choices=[16, 8, 4], default=[16, 8, 4])
    parts["tma"].add_argument("--parts", nargs="+", choices=["stream", "gemv"], default=["stream", "gemv"])
    p = parts["prefill"]
    p.add_argument("--config", default="llama-2-7b")
    p.add_argument("--prompt-len", type=int, default=2048)
    p.add_argument("--attn-impl", default="pallas")
    parts["ncu-summary"].add_argument("--file", required=True, help="ncu --csv --page raw output")
    p = parts["allreduce"]
    p.add_argument("--dim", type=int, default=8192)
    p.add_argument("--ffn", type=int, default=28672)
    p.add_argument("--steps", type=int, default=64)
    p = parts["hlo"]
    p.add_argument("--config", default="llama-2-7b")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--cache-len", type=int, default=512)
    p.add_argument("--attn-impl", default=None)
    p.add_argument("--dump", default=None, help="write the optimized HLO text here")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    own = {"step-profile": "step_profile", "engine": "engine", "speculative": "speculative_bench", "serve": "serve",
           "stream": "stream", "ttft": "ttft"}  # parts that parse their own options
    if argv[:1] and argv[0] in own:
        return importlib.import_module(f"scripts.gpu.{own[argv[0]]}").main(argv[1:]) or 0
    args = parser().parse_args(argv)
    module, fn, _ = PARTS[args.part]
    getattr(importlib.import_module(f"scripts.gpu.{module}"), fn)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
