"""Bad input and interruptions at the `jllm` command line: a clear message naming the value and
the right exit status, before anything heavy runs; nothing lost in chat; no tracebacks."""
import builtins
import io
import json
import os
import socket
import subprocess
import sys
import time

import pytest

import jllm
from jllm import bench, parallel
from jllm.config import CONFIGS, LlamaConfig
from jllm import cli
from scripts import quickstart

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _parse_error(argv: list[str], capsys) -> str:
    """Run the command, expecting argparse's refusal (exit status 2); return stderr."""
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    return capsys.readouterr().err


@pytest.fixture
def no_load(monkeypatch):
    """jllm.load and bench's weight makers fail the test: a check must come before them."""
    def fail(*args, **kwargs):
        raise AssertionError("the model was loaded (or weights made) before the bad value was refused")
    monkeypatch.setattr(jllm, "load", fail)
    monkeypatch.setattr(parallel, "random_params", fail)


@pytest.fixture
def recorded_generate(monkeypatch):
    """Every jllm.generate call's prompt token ids, the call itself going through unchanged."""
    calls, real = [], jllm.generate

    def generate(model, prompts, **kw):
        calls.append(list(prompts[0]))
        return real(model, prompts, **kw)

    monkeypatch.setattr(jllm, "generate", generate)
    return calls


def _typed(monkeypatch, lines):
    """input() returns each item of `lines` in turn, or raises it if it is an exception."""
    lines, prompts = list(lines), []

    def fake_input(prompt=""):
        prompts.append(prompt)
        item = lines.pop(0)
        if isinstance(item, BaseException):
            raise item
        return item

    monkeypatch.setattr(builtins, "input", fake_input)
    return prompts


def _chat(argv: list[str]) -> int:
    """cli.main for chat; a KeyboardInterrupt escaping it fails the test (not the whole run)."""
    try:
        return cli.main(argv)
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped jllm chat")


# --- bench sizes and JSON (row 3) ---

@pytest.mark.parametrize("flag,value", [("--batch", "0"), ("--prompt-len", "0"), ("--new-tokens", "0"),
                                         ("--batch", "-2"), ("--new-tokens", "ten")])
def test_bench_refuses_sizes_below_one_when_parsing(flag, value, capsys, no_load):
    err = _parse_error(["bench", "--config", "tiny", "--random-weights", flag, value], capsys)
    assert f"argument {flag}: expected an int >= 1, got {value}" in err.replace("'", "")


@pytest.mark.parametrize("prompt_len,new_tokens", [(100000, 128), (500, 13), (512, 1)])
def test_bench_refuses_a_prompt_and_reply_beyond_the_context_before_making_weights(
        prompt_len, new_tokens, capsys, no_load):
    limit = CONFIGS["tiny"]["max_seq_len"]
    assert cli.main(["bench", "--config", "tiny", "--random-weights", "--prompt-len", "8", str(prompt_len),
                     "--new-tokens", str(new_tokens)]) == 2
    err = capsys.readouterr().err
    assert f"--prompt-len {prompt_len} + --new-tokens {new_tokens} = {prompt_len + new_tokens}" in err
    assert f"context of {limit}" in err


def test_bench_accepts_a_prompt_and_reply_that_exactly_fill_the_context(tmp_path):
    out = tmp_path / "b.json"
    assert cli.main(["bench", "--config", "tiny", "--prompt-len", "510", "--new-tokens", "2",
                     "--no-warm-compile", "--bandwidth", "1", "--peak-tflops", "1",
                     "--json", str(out)]) == 0
    [row] = json.loads(out.read_text())
    assert (row["prompt_len"], row["new_tokens"], row["cache_len"]) == (510, 2, 512)


@pytest.mark.parametrize("kw,named", [
    (dict(batch=0), "batch=0"), (dict(prompt_len=-1), "prompt_len=-1"),
    (dict(new_tokens=0), "new_tokens=0"), (dict(batch=1.5), "batch=1.5"),
    (dict(prompt_len=500, new_tokens=13), "512"), (dict(bandwidth=0.0), "bandwidth=0.0"),
])
def test_bench_run_refuses_bad_sizes_with_a_value_error(kw, named, no_load):
    with pytest.raises(ValueError, match=named.replace(".", r"\.")):
        bench.run(LlamaConfig.from_name("tiny"), "tiny", **kw)


def test_bench_without_random_weights_flag_writes_strict_json_with_null_warm_compile(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "tiny", "--prompt-len", "8", "--new-tokens", "2",
                     "--no-warm-compile", "--bandwidth", "1", "--peak-tflops", "1",
                     "--json", str(out)]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} in the JSON output")

    [row] = json.loads(out.read_text(), parse_constant=refuse)
    assert row["compile_warm_s"] is None and row["compile_cold_s"] > 0
    json.dumps(row, allow_nan=False)
    table_row = capsys.readouterr().out.splitlines()[1]
    assert table_row.split()[-1].endswith("/-")
    assert [f for f in os.listdir(tmp_path)] == ["bench.json"]  # no temporary file left


# --- invalid UTF-8 (row 9) ---

def test_generate_refuses_a_prompt_that_is_not_utf8_before_loading(tiny_checkpoint, capsys, no_load):
    err = _parse_error(["generate", "--model", tiny_checkpoint, "--prompt", "abc\udcff"], capsys)
    assert "argument --prompt" in err and "0xff at character 4 is not valid UTF-8" in err
    assert "Traceback" not in err


def test_generate_refuses_invalid_utf8_bytes_from_the_shell(tiny_checkpoint):
    """The bytes as a shell passes $'abc\\xff': argv decoding turns 0xff into a lone surrogate."""
    proc = subprocess.run([sys.executable, "-m", "jllm", "generate", "--model", tiny_checkpoint,
                           "--prompt", b"abc\xff"], cwd=ROOT, capture_output=True, timeout=120)
    err = proc.stderr.decode()
    assert proc.returncode == 2, err
    assert "0xff at character 4 is not valid UTF-8" in err and "Traceback" not in err


def test_chat_refuses_a_line_that_is_not_utf8_and_keeps_the_conversation(
        tiny_checkpoint, tokenizer, capsys, monkeypatch, recorded_generate):
    # A strict UTF-8 stdin (a UTF-8 locale): the chat reads the bad byte as a character it refuses.
    stdin = io.TextIOWrapper(io.BytesIO(b"Hello there\nab\xffc\nHow are you\n/exit\n"),
                             encoding="utf-8", errors="strict")
    monkeypatch.setattr(sys, "stdin", stdin)
    assert _chat(["chat", "--model", tiny_checkpoint, "--max-new-tokens", "3", "--attn-impl", "xla"]) == 0
    err = capsys.readouterr().err
    assert "not sent: the byte 0xff at character 3 is not valid UTF-8" in err
    assert len(recorded_generate) == 2
    second = tokenizer.decode(recorded_generate[1])
    assert "Hello there" in second and "How are you" in second


def test_chat_survives_a_line_that_cannot_be_decoded(tiny_checkpoint, capsys, monkeypatch,
                                                     recorded_generate):
    bad = UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")
    _typed(monkeypatch, ["Hello", bad, "/stats", EOFError()])
    assert _chat(["chat", "--model", tiny_checkpoint, "--max-new-tokens", "3", "--attn-impl", "xla"]) == 0
    err = capsys.readouterr().err
    assert "not valid UTF-8" in err and "0xff" in err
    assert "prefill:" in err  # /stats still answered about the reply before the bad line
    assert len(recorded_generate) == 1


# --- values checked when parsing, before the model loads (row 10) ---

@pytest.mark.parametrize("flag,value,expected", [
    ("--temperature", "-0.5", "a number >= 0"), ("--temperature", "nan", "a number >= 0"),
    ("--top-p", "0", "a number in (0, 1]"), ("--top-p", "1.5", "a number in (0, 1]"),
    ("--top-k", "0", "an int >= 1"), ("--max-new-tokens", "0", "an int >= 1"),
    ("--tp", "0", "an int >= 1"), ("--dp", "-1", "an int >= 1"),
    ("--num-processes", "0", "an int >= 1"), ("--process-id", "-1", "an int >= 0"),
    ("--distributed-timeout", "0", "a number > 0"), ("--coordinator", "localhost", "HOST:PORT"),
    ("--stop", "", "non-empty text"), ("--prompt", "", "non-empty text"),
    ("--seed", "-1", r"an int in [0, 2**32)"), ("--seed", "4294967296", r"an int in [0, 2**32)"),
    ("--presence-penalty", "2.5", "a number in [-2, 2]"), ("--frequency-penalty", "nan", "a number in [-2, 2]"),
    ("--repetition-penalty", "0", "a number in [0.01, 100]"), ("--repetition-penalty", "1e-50", "a number in [0.01, 100]"),
    ("--logit-bias", "13", "TOKEN_ID=BIAS"), ("--logit-bias", "13=150", "TOKEN_ID=BIAS"),
    ("--logit-bias", "x=1", "TOKEN_ID=BIAS"), ("--logit-bias", "1.5=5", "TOKEN_ID=BIAS"),
    ("--logit-bias", "13=nan", "TOKEN_ID=BIAS"),
    ("--logprobs", "21", "an int in [0, 20]"), ("--logprobs", "-1", "an int in [0, 20]"),
    ("--logprobs", "2.5", "an int in [0, 20]"), ("--min-p", "1.5", "a number in [0, 1]"),
    ("--min-p", "-0.1", "a number in [0, 1]"),
])
def test_generate_refuses_bad_values_before_loading(flag, value, expected, tiny_checkpoint, capsys, no_load):
    argv = ["generate", "--model", tiny_checkpoint, "--prompt", "Hi", flag, value]
    err = _parse_error(argv, capsys)
    assert f"argument {flag}: expected {expected}" in err and value in err


def test_group_size_must_be_an_int4_size(tiny_checkpoint, capsys, no_load):
    err = _parse_error(["generate", "--model", tiny_checkpoint, "--prompt", "Hi", "--quantize", "int4",
                        "--group-size", "48"], capsys)
    assert "argument --group-size: invalid choice: 48" in err and "32, 64, 128, 256" in err
    assert cli.main(["generate", "--model", tiny_checkpoint, "--prompt", "Hi", "--group-size", "64"]) == 2
    assert "--group-size 64 applies to --quantize int4 only" in capsys.readouterr().err


def test_flags_that_disagree_or_a_missing_model_are_refused_before_loading(tmp_path, tiny_checkpoint,
                                                                            capsys, no_load):
    assert cli.main(["generate", "--model", tiny_checkpoint, "--prompt", "Hi", "--num-processes", "2",
                     "--process-id", "2"]) == 2
    assert "--process-id 2 must be below --num-processes 2" in capsys.readouterr().err
    missing = str(tmp_path / "nothing-here")
    assert cli.main(["chat", "--model", missing]) == 2
    assert f"--model {missing!r} is not a directory" in capsys.readouterr().err


def test_chat_refuses_max_new_tokens_zero_at_start(tiny_checkpoint, capsys, monkeypatch, no_load):
    prompts = _typed(monkeypatch, ["Hello", "/exit"])
    err = _parse_error(["chat", "--model", tiny_checkpoint, "--max-new-tokens", "0"], capsys)
    assert "argument --max-new-tokens: expected an int >= 1, got 0" in err
    assert prompts == []


def test_environment_defaults_are_checked_like_flags(tiny_checkpoint, capsys, monkeypatch, no_load):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "zero")
    err = _parse_error(["generate", "--model", tiny_checkpoint, "--prompt", "Hi"], capsys)
    assert "argument --num-processes: expected an int >= 1, got 'zero'" in err


# --- a missing peer in a multi-process run (row 13) ---

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_missing_peer_gives_up_after_the_timeout_with_a_message():
    address = f"127.0.0.1:{_free_port()}"
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jllm", "bench", "--config", "tiny",
                           "--coordinator", address, "--num-processes", "2", "--process-id", "0",
                           "--distributed-timeout", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    elapsed = time.perf_counter() - t
    assert proc.returncode == 2, proc.stderr
    assert f"waiting for 2 processes at {address} (timeout 3 s)" in proc.stderr
    assert f"gave up after 3 s: not all 2 processes joined at {address}" in proc.stderr
    assert "Check failure" not in proc.stderr and "Traceback" not in proc.stderr
    assert 3 < elapsed < 60


def test_initialize_distributed_refuses_a_timeout_that_is_not_positive():
    for bad in (0, -1.0, float("inf"), "300"):
        with pytest.raises(ValueError, match="timeout_s="):
            parallel.initialize_distributed("127.0.0.1:1", 2, 0, timeout_s=bad)


# --- chat commands, Ctrl-C, Ctrl-D, broken pipes, outputs checked first (row 15) ---

def test_chat_help_and_unknown_commands_are_not_sent_to_the_model(tiny_checkpoint, tokenizer, capsys,
                                                                  monkeypatch, recorded_generate):
    _typed(monkeypatch, ["/help", "/bogus arg", "//usr is a folder", "/exit"])
    assert _chat(["chat", "--model", tiny_checkpoint, "--max-new-tokens", "2", "--attn-impl", "xla"]) == 0
    err = capsys.readouterr().err
    assert "unknown command '/bogus'" in err
    after_start = err.split("jllm chat:", 1)[1]
    for command in ("/help", "/stats", "/reset", "/exit"):
        assert after_start.count(command) >= 3, command  # the banner, /help, the unknown command
    assert len(recorded_generate) == 1  # only the // message, sent with one slash
    text = tokenizer.decode(recorded_generate[0])
    assert "/usr is a folder" in text and "//usr" not in text


def test_chat_ctrl_d_ends_the_line_and_exits_zero(tiny_checkpoint, capsys, monkeypatch):
    _typed(monkeypatch, [EOFError()])
    assert _chat(["chat", "--model", tiny_checkpoint]) == 0
    assert capsys.readouterr().out == "\n"


def test_chat_ctrl_c_at_the_prompt_exits_130(tiny_checkpoint, capsys, monkeypatch):
    _typed(monkeypatch, [KeyboardInterrupt()])
    assert _chat(["chat", "--model", tiny_checkpoint]) == 130
    captured = capsys.readouterr()
    assert captured.out == "\n" and "Traceback" not in captured.err


def test_chat_ctrl_c_during_a_reply_stops_it_and_keeps_the_conversation(tiny_checkpoint, tokenizer,
                                                                        capsys, monkeypatch):
    calls, real = [], jllm.generate

    def generate(model, prompts, *, stream, **kw):
        """Ctrl-C arrives during the first reply, after its first piece of text."""
        calls.append(list(prompts[0]))
        if len(calls) > 1:
            return real(model, prompts, stream=stream, **kw)

        def interrupted(delta):
            stream(delta)
            raise KeyboardInterrupt

        real(model, prompts, stream=interrupted, **kw)
        raise KeyboardInterrupt  # no text came: Ctrl-C at the end of the reply

    monkeypatch.setattr(jllm, "generate", generate)
    _typed(monkeypatch, ["Hello there", "/stats", "How are you", "/exit"])
    assert _chat(["chat", "--model", tiny_checkpoint, "--max-new-tokens", "6", "--attn-impl", "xla"]) == 0
    err = capsys.readouterr().err
    assert "(reply stopped)" in err
    assert "(no reply yet)" in err  # /stats after the stopped reply: nothing finished yet
    assert len(calls) == 2
    second = tokenizer.decode(calls[1])
    assert "Hello there" in second and "How are you" in second


def test_generate_into_a_closed_pipe_exits_quietly(tiny_checkpoint):
    """`jllm generate ... | head -c 3`: the reader leaves after 3 bytes."""
    proc = subprocess.Popen([sys.executable, "-m", "jllm", "generate", "--model", tiny_checkpoint,
                             "--prompt", "The library", "--max-new-tokens", "24", "--attn-impl", "xla"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.read(3) == b"The"
        proc.stdout.close()
        err = proc.stderr.read().decode()
        status = proc.wait(timeout=120)
    finally:
        proc.kill()
    assert "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err, err
    assert status == 1, err


def test_plot_without_matplotlib_is_refused_before_running(tmp_path, capsys, monkeypatch, no_load):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert cli.main(["bench", "--config", "tiny", "--random-weights", "--plot", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "jllm[bench]" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("where", ["directory", "under_a_file", "missing_folder"])
@pytest.mark.parametrize("flag", ["--json", "--plot"])
def test_bench_output_paths_are_checked_before_running(flag, where, tmp_path, capsys, no_load):
    (tmp_path / "file").write_text("x")
    path = {"directory": tmp_path, "under_a_file": tmp_path / "file" / "out",
            "missing_folder": tmp_path / "no" / "out"}[where]
    assert cli.main(["bench", "--config", "tiny", "--random-weights", flag, str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{flag} {str(path)!r}" in err
    assert ("is a directory" if where == "directory" else "cannot be written") in err
    assert sorted(os.listdir(tmp_path)) == ["file"]


def test_a_plot_name_matplotlib_cannot_write_is_refused_before_running(tmp_path, capsys, no_load):
    assert cli.main(["bench", "--config", "tiny", "--plot", str(tmp_path / "res.out")]) == 2
    err = capsys.readouterr().err
    assert "cannot write .out files" in err and "png" in err
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("mode, extra", [("engine", ["--requests", "2"]),
                                         ("serve", ["--url", "http://127.0.0.1:9", "--model", "tiny"])])
def test_bench_options_before_a_mode_are_refused_not_dropped(mode, extra, tmp_path, capsys, no_load):
    """`jllm bench --json a.json engine` parsed --json for the model benchmark, then ran the engine
    benchmark with its own defaults: the file was never written."""
    assert cli.main(["bench", "--json", str(tmp_path / "a.json"), "--tp", "4", mode, *extra]) == 2
    err = capsys.readouterr().err
    assert f"--json --tp before {mode!r} would be ignored" in err and f"jllm bench {mode} --help" in err
    assert os.listdir(tmp_path) == []


def test_a_self_draft_of_a_quantized_target_is_refused_before_running(capsys, no_load):
    assert cli.main(["bench", "--config", "tiny", "--quantize", "int8", "--speculate", "2",
                     "--draft-quantize", "int4"]) == 2
    assert "the target is already --quantize int8" in capsys.readouterr().err


def test_bench_help_lists_the_config_names_and_says_random_weights_is_the_only_mode(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for name in CONFIGS:
        assert name in out
    assert "random weights of a named config are the only mode" in out


def test_quickstart_says_where_the_demo_model_is_and_what_to_run_next(tmp_path, tiny_checkpoint, capsys):
    demo = tmp_path / "demo"
    demo.mkdir()
    os.symlink(tiny_checkpoint, demo / "jllm")  # an existing demo is reused, not rebuilt
    assert quickstart.main(["--dir", str(demo), "--max-new-tokens", "3"]) == 0
    err = capsys.readouterr().err
    ck = os.path.join(str(demo), "jllm")
    assert f"The demo model is in {demo}" in err and os.path.join(str(demo), "hf") in err
    assert f"jllm chat --model {ck}" in err


def test_generate_checks_its_arguments_before_echoing_the_prompt(tiny_checkpoint, capsys):
    """A prompt too long for the context (and a K past it) is refused on its own line: nothing
    of the prompt is printed first."""
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--prompt", "word " * 600]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "over the model's context" in err
    assert cli.main(["generate", "--model", str(tiny_checkpoint), "--prompt", "Hi",
                     "--speculate", "100000", "--prompt-lookup", "2"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "k=100000: a step checks k + 1 positions" in err


def test_a_character_the_terminal_cannot_show_is_replaced_not_fatal(tiny_checkpoint):
    """PYTHONIOENCODING=ascii: generated text outside ASCII prints as '?', and the run ends 0."""
    env = {**os.environ, "PYTHONIOENCODING": "ascii", "PYTHONPATH": ROOT}
    r = subprocess.run([sys.executable, "-m", "jllm", "generate", "--model", str(tiny_checkpoint),
                        "--prompt", "Hello", "--max-new-tokens", "24", "--temperature", "5", "--seed", "3"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-500:]
    assert "error" not in r.stderr


def test_a_system_prompt_that_fills_the_context_is_refused_at_start(tiny_checkpoint, capsys, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda prompt="": pytest.fail("read a line before refusing --system"))
    assert cli.main(["chat", "--model", str(tiny_checkpoint), "--system", "word " * 600]) == 2
    assert "--system takes" in capsys.readouterr().err
