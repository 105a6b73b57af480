"""Run the whole pipeline on a built-in default: no download, no GPU.

Builds a small random-weight Llama in Hugging Face format (its tokenizer a SentencePiece model
trained on local text), converts it with the same converter as real checkpoints, and generates with
stats. The weights are random, so the text is nonsense: this shows the machinery, not a model.

    python scripts/quickstart.py [--dir jllm-demo] [--prompt TEXT] [--llama3]

--llama3 builds it the way Llama-3.1 checkpoints come (in jllm-demo3 unless --dir says otherwise): a
byte-level BPE tokenizer.json with Llama-3's special tokens, chat template and
generation_config.json, and llama3 RoPE scaling.

It writes DIR/hf (the Hugging Face form) and DIR/jllm (the converted checkpoint), reuses them on
the next run, and ends by printing commands to try on them.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default=None, help="where the demo checkpoint goes (default jllm-demo, "
                                                 "with --llama3 jllm-demo3)")
    ap.add_argument("--prompt", default="The standard library of Python")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--llama3", action="store_true",
                    help="a Llama-3.1-style model: tokenizer.json (byte-level BPE), llama3 RoPE scaling")
    args = ap.parse_args(argv)
    args.dir = args.dir or ("jllm-demo3" if args.llama3 else "jllm-demo")

    from convert import tiny
    from jllm import hf
    from jllm.cli import main as cli_main
    from jllm.config import LlamaConfig, RopeScaling
    hf_dir, ck_dir = os.path.join(args.dir, "hf"), os.path.join(args.dir, "jllm")
    if not os.path.isdir(ck_dir):
        kind = "Llama-3.1-style " if args.llama3 else ""
        print(f"building a tiny random-weight {kind}Llama (HF format) in {hf_dir}", file=sys.stderr)
        if args.llama3:   # Llama-3.1's RoPE over a tiny trained context, so that its scaling shows
            cfg = LlamaConfig.from_name("tiny", rope_theta=5e5, rope_scaling=RopeScaling(
                "llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position=64))
            tiny.make_tiny_hf(hf_dir, cfg, tokenizer="bpe")
        else:
            tiny.make_tiny_hf(hf_dir)
        hf.convert(hf_dir, ck_dir, dtype="float32")
    print("NOTE: random weights; the output below is meaningless text.\n", file=sys.stderr)
    status = cli_main(["generate", "--model", ck_dir, "--prompt", args.prompt,
                       "--max-new-tokens", str(args.max_new_tokens), "--temperature", "0.8",
                       "--top-k", "50", "--seed", "0"])
    if status == 0:
        print(f"\nThe demo model is in {args.dir}: {hf_dir} (Hugging Face format) and {ck_dir} "
              f"(jllm checkpoint). Next:\n"
              f"  jllm chat --model {ck_dir}\n"
              f"  jllm generate --model {ck_dir} --prompt \"Hello\" --max-new-tokens 32\n"
              f"  jllm generate --model {ck_dir} --quantize int8 --prompt \"Hello\"\n"
              f"  jllm bench --config tiny\n"
              "(without pip install: python -m jllm instead of jllm)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
