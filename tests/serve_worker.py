"""A server process for tests/test_serve.py: the tiny random model behind `jllm.serve.main.serve`.

    python tests/serve_worker.py TOKENIZER_MODEL [--step-delay S] [--shutdown-timeout S] [--log-json]

Listens on 127.0.0.1, a free port, logged as "listening on http://127.0.0.1:PORT".
"""
import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import conftest  # noqa: E402,F401  (the repository root on sys.path, no compilation cache, CPU flags)
from conftest import make_model  # noqa: E402

from jllm.config import LlamaConfig  # noqa: E402
from jllm.engine import Engine  # noqa: E402
from jllm.serve.app import create_app  # noqa: E402
from jllm.serve.main import bind, serve, setup_logging  # noqa: E402
from jllm.serve.runner import EngineRunner  # noqa: E402
from jllm.tokenizer import SentencePieceTokenizer as Tokenizer  # noqa: E402


class SlowEngine(Engine):
    """The engine with a sleep before each step, as a slower device would take."""
    step_delay_s = 0.0

    def step(self):
        if self.step_delay_s:
            time.sleep(self.step_delay_s)
        return super().step()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("tokenizer")
    p.add_argument("--step-delay", type=float, default=0.0)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    p.add_argument("--log-json", action="store_true")
    args = p.parse_args()
    setup_logging(args.log_json)
    model = make_model(LlamaConfig.from_name("tiny"), Tokenizer(args.tokenizer))
    engine = SlowEngine(model, max_seqs=16, max_tokens_per_step=64, num_pages=128, progress=False)
    engine.step_delay_s = args.step_delay
    app = create_app(EngineRunner(engine), "tiny", cfg=model.cfg, tokenizer=model.tokenizer)
    return serve(app, bind("127.0.0.1", 0), shutdown_timeout=args.shutdown_timeout)


if __name__ == "__main__":
    sys.exit(main())
