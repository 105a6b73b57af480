"""The `jllm` command line: generate, chat, convert, bench (in process, tiny models)."""
import io
import json
import os
import re
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import jllm
from convert import tiny
from jllm.config import LlamaConfig
from jllm import cli


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    hf_dir = tiny.make_tiny_hf(str(root / "hf"))
    out = str(root / "jllm")
    assert cli.main(["convert", hf_dir, out, "--dtype", "float32"]) == 0
    return hf_dir, out


def test_convert_writes_a_loadable_checkpoint_and_refuses_an_existing_dir(tiny_dirs, capsys):
    hf_dir, out = tiny_dirs
    assert os.path.isfile(os.path.join(out, "jllm.json"))
    assert cli.main(["convert", hf_dir, out]) == 2
    assert "already exists" in capsys.readouterr().err


def test_convert_with_quantize_stores_the_mode(tiny_dirs, tmp_path):
    hf_dir, _ = tiny_dirs
    out = str(tmp_path / "q8")
    assert cli.main(["convert", hf_dir, out, "--quantize", "int8"]) == 0
    with open(os.path.join(out, "jllm.json")) as f:
        assert json.load(f)["quant"]["mode"] == "int8"


def test_generate_streams_the_completion_then_stats(tiny_dirs, capsys):
    _, ck = tiny_dirs
    assert cli.main(["generate", "--model", ck, "--prompt", "The library", "--max-new-tokens", "6",
                     "--attn-impl", "xla"]) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("The library")
    assert len(captured.out.strip()) > len("The library")
    assert "generated 6 (length)" in captured.err or "(stop)" in captured.err


def test_generate_on_an_int8_model(tiny_dirs, capsys):
    _, ck = tiny_dirs
    assert cli.main(["generate", "--model", ck, "--prompt", "Hi", "--max-new-tokens", "4",
                     "--quantize", "int8", "--attn-impl", "xla"]) == 0
    assert "prompt" in capsys.readouterr().err


def test_generate_passes_penalties_and_logit_bias(tiny_dirs, capsys, monkeypatch):
    """--logit-bias ID=BIAS (repeatable) and the penalty flags reach jllm.generate: +100 forces a
    greedy token; a token named twice is refused."""
    _, ck = tiny_dirs
    seen, real = [], jllm.generate

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        seen.append((kwargs, out))
        return out

    monkeypatch.setattr(jllm, "generate", spy)
    assert cli.main(["generate", "--model", ck, "--prompt", "Hi", "--max-new-tokens", "4", "--attn-impl", "xla",
                     "--logit-bias", "42=100", "--logit-bias", "7=-100", "--presence-penalty", "0.5"]) == 0
    [(kwargs, out)] = seen
    assert kwargs["logit_bias"] == {42: 100.0, 7: -100.0} and kwargs["presence_penalty"] == 0.5
    assert out[0].tokens == [42] * 4
    assert cli.main(["generate", "--model", ck, "--prompt", "Hi", "--logit-bias", "42=1",
                     "--logit-bias", "42=2"]) == 2
    assert "--logit-bias names token 42 twice" in capsys.readouterr().err


def test_generate_reports_bad_sampling_values_as_an_error(tiny_dirs, capsys):
    _, ck = tiny_dirs
    with pytest.raises(SystemExit) as e:  # refused while parsing, before the model loads
        cli.main(["generate", "--model", ck, "--prompt", "Hi", "--top-p", "1.5"])
    assert e.value.code == 2
    assert "--top-p: expected a number in (0, 1], got 1.5" in capsys.readouterr().err


def test_chat_answers_reports_stats_resets_and_exits(tiny_dirs, capsys, monkeypatch):
    _, ck = tiny_dirs
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/stats\n/reset\n/stats\n/exit\n"))
    assert cli.main(["chat", "--model", ck, "--max-new-tokens", "5", "--attn-impl", "xla"]) == 0
    err = capsys.readouterr().err
    assert "prefill:" in err and "decode:" in err
    assert "(conversation cleared)" in err


# A template unlike Llama-2's, refusing a message that says "forbidden".
SIMPLE_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if 'forbidden' in m['content'] %}"
                   "{{ raise_exception('no forbidden words') }}{% endif %}"
                   "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant] {% endif %}")


@pytest.fixture()
def templated_checkpoint(tiny_dirs, tmp_path):
    import shutil
    ck = str(tmp_path / "templated")
    shutil.copytree(tiny_dirs[1], ck)
    with open(os.path.join(ck, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": SIMPLE_TEMPLATE}, f)
    return ck


def test_chat_renders_the_checkpoints_template_and_seeds_each_reply(templated_checkpoint, capsys, monkeypatch):
    """Each turn's prompt is the template's rendering of the conversation so far (the replies
    included), a message the template refuses is not sent and not kept, and each reply samples
    from its own seed."""
    import jllm
    from jllm.chat import ChatTemplate
    calls, real = [], jllm.generate

    def spy(model, prompts, **kw):
        out = real(model, prompts, **kw)
        calls.append((model, prompts[0], kw["seed"], out[0].text))
        return out

    monkeypatch.setattr("jllm.generate", spy)
    monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\nsay forbidden\nAnd again\n/exit\n"))
    assert cli.main(["chat", "--model", templated_checkpoint, "--system", "Be brief.", "--max-new-tokens", "4",
                     "--attn-impl", "xla", "--seed", "7"]) == 0
    assert "(not sent: the chat template refused the messages: no forbidden words)" in capsys.readouterr().err
    assert [c[2] for c in calls] == [7, 8]
    model = calls[0][0]
    template = ChatTemplate(SIMPLE_TEMPLATE, model.tokenizer)
    first = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    second = first + [{"role": "assistant", "content": calls[0][3]}, {"role": "user", "content": "And again"}]
    assert calls[0][1] == template.encode(first)
    assert calls[1][1] == template.encode(second)
    # (the tiny tokenizer normalizes the newlines to spaces)
    assert model.tokenizer.decode(calls[0][1]).split() == "[system] Be brief. [user] Hello there [assistant]".split()


def test_chat_template_flag_replaces_the_checkpoints(templated_checkpoint, tmp_path, capsys, monkeypatch):
    """--chat-template FILE (or the template itself) renders the conversation instead of the
    checkpoint's template; one that is neither is refused before the load."""
    import jllm
    from jllm.chat import ChatTemplate
    other = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}<assistant>"
    (tmp_path / "t.jinja").write_text(other)
    prompts, real = [], jllm.generate

    def spy(model, ps, **kw):
        prompts.append((model, ps[0]))
        return real(model, ps, **kw)

    monkeypatch.setattr("jllm.generate", spy)
    for flag in (str(tmp_path / "t.jinja"), other):
        monkeypatch.setattr("sys.stdin", io.StringIO("Hello there\n/exit\n"))
        assert cli.main(["chat", "--model", templated_checkpoint, "--max-new-tokens", "2", "--attn-impl", "xla",
                         "--chat-template", flag]) == 0
        model, ids = prompts[-1]
        assert ids == ChatTemplate(other, model.tokenizer).encode([{"role": "user", "content": "Hello there"}])
    monkeypatch.setattr("jllm.load", lambda *a, **k: pytest.fail("loaded the model"))
    assert cli.main(["chat", "--model", templated_checkpoint, "--chat-template", "missing.jinja"]) == 2
    assert "--chat-template 'missing.jinja' is neither a file nor a jinja2 template" in capsys.readouterr().err


def test_chat_refuses_a_template_that_does_not_compile_before_loading(templated_checkpoint, capsys, monkeypatch):
    with open(os.path.join(templated_checkpoint, "tokenizer_config.json"), "w") as f:
        json.dump({"chat_template": "{% for m in messages %}"}, f)
    monkeypatch.setattr("jllm.load", lambda *a, **k: pytest.fail("loaded the model"))
    assert cli.main(["chat", "--model", templated_checkpoint]) == 2
    assert "the chat_template does not compile" in capsys.readouterr().err


def test_bench_writes_json_with_every_metric(tmp_path, capsys):
    out = tmp_path / "bench.json"
    plot = tmp_path / "bench.png"
    assert cli.main(["bench", "--config", "tiny", "--random-weights", "--batch", "1", "2",
                     "--prompt-len", "20", "--new-tokens", "4", "--json", str(out),
                     "--plot", str(plot)]) == 0
    rows = json.loads(out.read_text())
    assert [r["batch"] for r in rows] == [1, 2]
    for r in rows:
        for field in ("ttft_ms", "tpot_ms", "decode_tok_s_per_seq", "decode_tok_s_total", "mbu",
                      "mfu_prefill", "compile_cold_s"):
            assert r[field] > 0, field
        assert r["decode_tok_s_total"] == pytest.approx(r["batch"] * r["decode_tok_s_per_seq"])
    assert plot.stat().st_size > 1000
    assert "tok/s" in capsys.readouterr().out


def test_bench_compares_matmul_impls_without_a_warm_compile(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "tiny", "--random-weights", "--quantize", "int8",
                     "--matmul-impl", "pallas", "xla", "--prompt-len", "8", "--new-tokens", "2",
                     "--no-warm-compile", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["quant"], r["matmul_impl"]) for r in rows] == [("int8", "pallas"), ("int8", "xla")]
    assert all(r["compile_warm_s"] is None and r["tpot_ms"] > 0 for r in rows)


def test_bench_compares_kv_cache_dtypes_and_counts_int8_cache_bytes(tmp_path):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "tiny", "--random-weights", "--kv-cache", "auto", "int8",
                     "--prompt-len", "8", "--new-tokens", "2", "--no-warm-compile", "--bandwidth", "1",
                     "--peak-tflops", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["kv_cache_dtype"] for r in rows] == ["bfloat16", "int8"]
    # MBU's byte count (MBU x TPOT x bandwidth): the weights plus the cache at context P + N / 2;
    # an int8 cache element is 1 byte plus a float32 scale per head_dim, against 2 bytes.
    cfg = LlamaConfig.from_name("tiny")
    kv_elements = 2 * cfg.n_layers * (8 + 2 / 2) * cfg.n_kv_heads * cfg.head_dim
    read = [r["mbu"] * r["tpot_ms"] * 1e-3 * 1e12 for r in rows]
    assert read[0] - read[1] == pytest.approx(kv_elements * (2 - (1 + 4 / cfg.head_dim)), rel=1e-6)


def test_generate_with_an_int8_kv_cache(tiny_dirs, capsys, monkeypatch):
    generate_module = sys.modules["jllm.generate"]  # (jllm.generate is also the function)
    made = []
    real_init = generate_module.init_cache
    monkeypatch.setattr(generate_module, "init_cache", lambda *a: made.append(a[3]) or real_init(*a))
    _, ck = tiny_dirs
    assert cli.main(["generate", "--model", ck, "--prompt", "Hello", "--max-new-tokens", "4",
                     "--kv-cache", "int8", "--attn-impl", "xla"]) == 0
    assert "generated " in capsys.readouterr().err
    assert made == [jnp.int8]


def test_bench_passes_xla_options_to_the_prefill_compile(tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert cli.main(["bench", "--config", "tiny", "--random-weights", "--prompt-len", "8",
                     "--new-tokens", "2", "--no-warm-compile", "--json", str(out),
                     "--prefill-xla-option", "xla_gpu_enable_triton_gemm=false",
                     "--prefill-xla-option", "xla_cpu_enable_fast_math=False"]) == 0
    [row] = json.loads(out.read_text())
    assert row["prefill_compiler_options"] == {"xla_gpu_enable_triton_gemm": False,
                                               "xla_cpu_enable_fast_math": False}
    assert "prefill XLA options" in capsys.readouterr().out
    assert cli.main(["bench", "--config", "tiny", "--random-weights", "--prefill-xla-option", "novalue"]) == 2
    assert "expected KEY=VALUE" in capsys.readouterr().err


def test_bench_unknown_config_names_the_known_ones(capsys):
    assert cli.main(["bench", "--config", "llama-9", "--random-weights"]) == 2
    assert "llama-2-7b" in capsys.readouterr().err


def test_generate_speculates_with_the_same_text_and_reports_acceptance(tiny_dirs, capsys):
    """--speculate K with a self-draft or prompt lookup prints the same greedy text as a plain run,
    and the stats line reports the acceptance."""
    _, ck = tiny_dirs
    base = ["generate", "--model", ck, "--prompt", "The standard library", "--max-new-tokens", "12"]
    assert cli.main(base) == 0
    plain = capsys.readouterr().out
    for flags in (["--speculate", "3", "--draft-quantize", "int8"], ["--speculate", "2", "--prompt-lookup", "2"]):
        assert cli.main(base + flags) == 0
        out, err = capsys.readouterr()
        assert out == plain, flags
        assert re.search(r"acceptance \d+\.\d%", err), err


def test_generate_prints_each_tokens_logprob_and_alternatives(tiny_dirs, capsys):
    """--logprobs N: a line per generated token after the output: its place, text, logprob and the
    N most likely tokens there, the values jllm.generate(logprobs=N) returns."""
    _, ck = tiny_dirs
    assert cli.main(["generate", "--model", ck, "--prompt", "Hi there", "--max-new-tokens", "5",
                     "--attn-impl", "xla", "--logprobs", "3"]) == 0
    out, err = capsys.readouterr()
    lines = err.split("token logprobs (position, token, logprob | most likely there):\n")[1].splitlines()
    model = jllm.load(ck, attn_impl="xla", progress=False)
    [ref] = jllm.generate(model, ["Hi there"], max_new_tokens=5, logprobs=3)
    assert out.strip() == ("Hi there" + ref.text).strip()
    assert len(lines) == len(ref.logprobs) >= 1
    for i, (line, (t, lp, top)) in enumerate(zip(lines, ref.logprobs)):
        head, _, alts = line.partition(" | ")
        assert head.split()[0] == str(i) and float(head.split()[-1]) == pytest.approx(lp, abs=1e-4)
        assert [float(a.rsplit(" ", 1)[1]) for a in alts.split(", ")] == pytest.approx([v for _, v in top], abs=1e-3)
        assert top[0][0] == t      # greedy: the token is its place's most likely


def test_generate_structured_output_flags(tiny_dirs, capsys, tmp_path):
    """--json-schema FILE, --regex, --json-object and --grammar FILE constrain the output (what
    jllm.generate(guided=...) gives); a file that is missing or not JSON is refused before loading."""
    _, ck = tiny_dirs
    schema = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["n"], "additionalProperties": False}
    (tmp_path / "s.json").write_text(json.dumps(schema))
    (tmp_path / "g.lark").write_text('start: "a" | "b"')
    base = ["generate", "--model", ck, "--prompt", "Hi", "--max-new-tokens", "30", "--attn-impl", "xla"]
    assert cli.main(base + ["--json-schema", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Hi") and set(json.loads(out[2:])) == {"n"}
    assert cli.main(base + ["--regex", "(yes|no)!"]) == 0
    assert capsys.readouterr().out.strip() in ("Hiyes!", "Hino!")
    assert cli.main(base + ["--grammar", str(tmp_path / "g.lark")]) == 0
    assert capsys.readouterr().out.strip() in ("Hia", "Hib")
    assert cli.main(base + ["--json-object"]) == 0
    assert capsys.readouterr().out[2:].startswith("{")
    (tmp_path / "bad.json").write_text("{not json")
    for flags, match in [(["--json-schema", str(tmp_path / "none.json")], "cannot read it"),
                         (["--json-schema", str(tmp_path / "bad.json")], "not valid JSON"),
                         (["--regex", "(ab"], "invalid regex")]:
        assert cli.main(base + flags) == 2
        assert match in capsys.readouterr().err


@pytest.mark.parametrize("flags,match", [
    (["--prompt-lookup", "2"], "--prompt-lookup needs --speculate"),
    (["--speculate", "2"], "exactly one of --draft, --draft-quantize, --prompt-lookup; got none"),
    (["--speculate", "2", "--prompt-lookup", "2", "--draft-quantize", "int8"], "got --draft-quantize, --prompt-lookup"),
    (["--speculate", "2", "--draft", "/nonexistent/draft"], "'/nonexistent/draft' is not a directory"),
    (["--speculate", "2", "--prompt-lookup", "2", "--frequency-penalty", "1"], "do not combine with --speculate"),
    (["--speculate", "2", "--prompt-lookup", "2", "--repetition-penalty", "1.2"], "do not combine with --speculate"),
    (["--speculate", "2", "--prompt-lookup", "2", "--logit-bias", "5=1"], "do not combine with --speculate"),
    (["--speculate", "2", "--prompt-lookup", "2", "--logprobs", "2"], "--logprobs does not combine with --speculate"),
    (["--speculate", "2", "--prompt-lookup", "2", "--json-object"], "do not combine with --speculate"),
])
def test_speculation_flags_are_checked_before_loading(tiny_dirs, capsys, flags, match):
    _, ck = tiny_dirs
    assert cli.main(["generate", "--model", ck, "--prompt", "Hi"] + flags) == 2
    assert match in capsys.readouterr().err


def test_bench_leaves_the_compilation_cache_setting_as_it_found_it(monkeypatch, capsys):
    """bench times cold and warm compiles in a temporary cache directory, deleted when it ends: the
    process's own setting (here: none) must come back, or later compiles write into a deleted dir."""
    import jax
    monkeypatch.delenv("JLLM_CACHE_DIR")
    before = jax.config.jax_compilation_cache_dir
    assert cli.main(["bench", "--config", "tiny", "--prompt-len", "8", "--new-tokens", "4"]) == 0
    assert jax.config.jax_compilation_cache_dir == before


def test_bench_engine_runs_the_offline_benchmark_and_writes_json(tmp_path, capsys, monkeypatch):
    """`jllm bench engine`: every request's output tokens counted, the generate baseline beside it."""
    from jllm.engine import Engine
    from jllm.engine import bench as engine_bench
    made = []

    def engine(model, **kw):
        made.append(kw)
        return Engine(model, **kw)

    monkeypatch.setattr(engine_bench, "Engine", engine)
    out = tmp_path / "engine.json"
    assert cli.main(["bench", "engine", "--config", "tiny", "--dtype", "float32", "--requests", "6",
                     "--prompt-len", "4", "12", "--output-len", "3", "6", "--max-seqs", "4",
                     "--max-tokens-per-step", "32", "--num-pages", "32", "--max-prompts-per-step", "3",
                     "--compile-workers", "2", "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["n_requests"] == 6 and r["output_tokens"] == sum(r["output_lens"])
    assert made[0]["max_prompts_per_step"] == 3 and made[0]["max_tokens_per_step"] == 32
    assert made[0]["compile_workers"] == 2
    assert r["baseline_output_tokens_per_s"] > 0 and r["speedup"] > 0
    assert "engine / generate" in capsys.readouterr().out


def test_device_memory_fraction_is_set_before_the_first_device_use_and_the_environment_wins(monkeypatch):
    """`jllm serve` / `jllm bench engine` let JAX take --device-memory-fraction of the GPU: the
    allocator reads it when the backend starts, so it is set only before that, and never over a
    value the user exported."""
    from jllm import runtime
    for bad in (0, 1.5, True, "0.9"):
        with pytest.raises(ValueError, match="device memory fraction"):
            runtime.set_device_memory_fraction(bad)
    for var in runtime.MEM_FRACTION_VARS:
        monkeypatch.delenv(var, raising=False)
    jax.devices()
    assert not runtime.set_device_memory_fraction(0.8)  # this process's backend has started
    assert not any(var in os.environ for var in runtime.MEM_FRACTION_VARS)
    fresh = textwrap.dedent("""
        import os, jax
        from jllm import runtime
        assert runtime.set_device_memory_fraction(0.9)
        assert os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.9"
        del os.environ["XLA_PYTHON_CLIENT_MEM_FRACTION"]
        jax.devices()
        assert not runtime.set_device_memory_fraction(0.8)
        assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
    """)
    exported = textwrap.dedent("""
        import os
        from jllm import runtime
        assert not runtime.set_device_memory_fraction(0.9)
        assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in os.environ
    """)
    env = {k: v for k, v in os.environ.items() if k not in runtime.MEM_FRACTION_VARS}
    subprocess.run([sys.executable, "-c", fresh], env=env, check=True)
    subprocess.run([sys.executable, "-c", exported], env={**env, "XLA_CLIENT_MEM_FRACTION": "0.5"}, check=True)


def test_serve_and_bench_serve_are_jllm_subcommands(capsys):
    for argv in (["serve", "--help"], ["bench", "serve", "--help"]):
        with pytest.raises(SystemExit) as e:
            cli.main(argv)
        assert e.value.code == 0
    assert "--max-seqs" in capsys.readouterr().out


def test_mbu_bytes_count_the_weights_once_per_data_parallel_replica(tiny_cfg):
    """Each dp replica reads every weight; the KV cache and the embedding rows are per sequence."""
    from conftest import random_params
    from jllm import bench
    from jllm.model import to_flat
    params = random_params(tiny_cfg, 0)
    flat = to_flat(params)
    emb = flat.pop("tok_embeddings")
    weights = sum(x.nbytes for x in jax.tree.leaves(flat)) + (emb.nbytes if tiny_cfg.tie_embeddings else 0)
    one = bench.step_bytes(params, tiny_cfg, 2, batch=4, context=10)
    assert bench.step_bytes(params, tiny_cfg, 2, batch=4, context=10, replicas=3) == one + 2 * weights


def test_jllm_serve_and_bench_serve_pass_the_cli_checks_to_their_runners(tiny_checkpoint, monkeypatch):
    """`jllm serve` has --speculate but no --draft (the check of the proposers once raised an
    AttributeError at every start), and `jllm bench serve --model` names the served model, which
    is not a directory here."""
    from jllm.serve import cli as serve_cli
    from jllm.serve import loadgen
    ran = []
    monkeypatch.setattr(serve_cli, "run", lambda args: ran.append(("serve", args.model)) or 0)
    monkeypatch.setattr(loadgen, "run_cli", lambda args: ran.append(("bench serve", args.model)) or 0)
    assert cli.main(["serve", "--model", str(tiny_checkpoint), "--port", "0"]) == 0
    assert cli.main(["serve", "--model", str(tiny_checkpoint), "--speculate", "2", "--prompt-lookup", "3"]) == 0
    assert cli.main(["bench", "serve", "--url", "http://127.0.0.1:9", "--model", "llama-2-7b"]) == 0
    assert ran == [("serve", str(tiny_checkpoint))] * 2 + [("bench serve", "llama-2-7b")]
