"""A real multi-process run: two processes on localhost, two CPU devices each, joined by
jax.distributed (gloo collectives), restore a checkpoint onto one 1 x 4 mesh (tp = 4 across both
processes) and generate greedily; the tokens equal a single-process run's.
"""
import json
import os
import socket
import subprocess
import sys

import pytest

import jllm
from jllm import hf
from convert.tiny import make_tiny_hf
from jllm.config import LlamaConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
PROMPTS = [[1, 5, 9, 22, 40, 7, 300], [1, 200, 3]]
MAX_NEW = 10  # as in the worker
TIMEOUT_S = 120
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.model")


# Runs `python -m jllm ARGS` with Python's sys.stdout on the original stdout pipe and file
# descriptor 1 moved to stderr. Gloo prints its connection notices to fd 1 from C++ threads, one
# character run at a time and interleaved with each other ("1 is connected to 30 peer ranks"), so
# no pattern can strip them reliably; this way stdout holds exactly what our code printed.
_CLI_STDOUT_ONLY = (
    "import os, runpy, sys\n"
    "ours = os.dup(1)\n"
    "os.dup2(2, 1)\n"
    "sys.stdout = open(ours, 'w', buffering=1)\n"
    "sys.argv = ['jllm'] + sys.argv[1:]\n"
    "runpy.run_module('jllm', run_name='__main__', alter_sys=True)\n")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """The tiny config (4 query heads, 2 KV heads: on tp=4 the KV heads are replicated)."""
    tmp = tmp_path_factory.mktemp("multihost")
    hf_dir = make_tiny_hf(str(tmp / "hf"), LlamaConfig.from_name("tiny"), tokenizer=False)
    path = str(tmp / "ckpt")
    hf.convert(hf_dir, path, dtype="float32", progress=False)
    return path


def _run_two(args_of, timeout: int = TIMEOUT_S) -> list[str]:
    """Start two processes (args_of(process_id) -> argv), wait for both; their outputs."""
    env = {**os.environ, "JLLM_CACHE_DIR": "off", "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2"}
    procs = []
    try:
        for pid in range(2):
            procs.append(subprocess.Popen(args_of(pid), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                          stderr=subprocess.PIPE, text=True))
        outs = [p.communicate(timeout=timeout) for p in procs]
        for pid, (p, (out, err)) in enumerate(zip(procs, outs)):
            assert p.returncode == 0, f"process {pid} exited {p.returncode}:\n{err[-4000:]}"
        return [out for out, _ in outs]
    finally:
        for p in procs:  # only the processes this test started, by handle
            if p.poll() is None:
                p.kill()
                p.wait()


def _single_process_tokens(checkpoint: str, prompts) -> list[list[int]]:
    model = jllm.load(checkpoint, progress=False)
    return [r.tokens for r in jllm.generate(model, prompts, max_new_tokens=MAX_NEW, stop_token_ids=[])]


def test_two_processes_generate_the_tokens_of_one(checkpoint, tmp_path):
    out = tmp_path / "tokens.json"
    coordinator = f"127.0.0.1:{_free_port()}"
    _run_two(lambda pid: [sys.executable, WORKER, "multihost", str(out), checkpoint,
                          json.dumps(PROMPTS), coordinator, "2", str(pid)])
    got = json.loads(out.read_text())
    assert (got["processes"], got["devices"]) == (2, 4)
    # Each process holds the wq shards of its own two devices only: [D, H*K / 4] each.
    assert got["wq_local_devices"] == 2 and got["wq_local_shards"] == [[64, 16]]
    assert got["tokens"] == _single_process_tokens(checkpoint, PROMPTS)


def test_cli_across_two_processes_prints_once(checkpoint):
    coordinator = f"127.0.0.1:{_free_port()}"
    prompt = PROMPTS[0]
    outs = _run_two(lambda pid: [
        sys.executable, "-c", _CLI_STDOUT_ONLY, "generate", "--model", checkpoint,
        "--prompt", " ".join(map(str, prompt)), "--max-new-tokens", str(MAX_NEW), "--tp", "4",
        "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(pid)])
    [want] = _single_process_tokens(checkpoint, [prompt])
    got = outs[0].split()
    assert all(t.isdigit() for t in got), f"unexpected output of process 0: {outs[0]!r}"
    assert [int(t) for t in got] == want  # process 0 streams the generated ids
    assert outs[1] == "", f"process 1 printed {outs[1]!r}"  # the other process prints nothing


def test_bench_runs_across_two_processes():
    """`jllm bench --tp 4` as two processes of two devices each: one program, one report."""
    coordinator = f"127.0.0.1:{_free_port()}"
    outs = _run_two(lambda pid: [
        sys.executable, "-c", _CLI_STDOUT_ONLY, "bench", "--config", "tiny", "--random-weights",
        "--tp", "4", "--prompt-len", "16", "--new-tokens", "4", "--no-warm-compile",
        "--coordinator", coordinator, "--num-processes", "2", "--process-id", str(pid)])
    rows = [line for line in outs[0].splitlines() if line.startswith("tiny ")]
    assert len(rows) == 1 and float(rows[0].split()[10]) > 0  # decode tokens/s per sequence
    assert "tiny " not in outs[1]  # process 1 runs silently
