"""Convert a Hugging Face Llama directory into a jllm checkpoint.

    python scripts/convert_hf.py HF_DIR OUT_DIR [--dtype bfloat16|float16|float32] [--overwrite]

--overwrite replaces an existing jllm checkpoint at OUT_DIR (once the new one is complete); it
never replaces the source, a directory holding it, or anything that is not a jllm checkpoint.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from jllm.cli import main as cli_main  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    return cli_main(["convert", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
