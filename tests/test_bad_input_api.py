"""Bad input to the Python API gets a clear error naming the value; odd but valid input works.

Also: compile time is reported apart from TTFT and decode speed, and a batch whose KV cache
would not fit the device runs in parts with the same results (device memory is faked on CPU).
"""
import dataclasses
import importlib
import math
import os
import shutil
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh, AxisType

import jllm
from jllm import costs
from jllm.model import init_cache
from jllm.tokenizer import SentencePieceTokenizer as Tokenizer
from sharding import rules

gen = importlib.import_module("jllm.generate")  # the module; `jllm.generate` is the function
N = 24  # max_new_tokens: a 16-token prompt bucket and a 64-slot cache, as in test_generate.py


def _is_jax_frame(entry) -> bool:
    return f"{os.sep}jax{os.sep}" in str(entry.path) or f"{os.sep}jaxlib{os.sep}" in str(entry.path)


def _raises(error, match, model, prompts, **kw):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(error, match=match) as e:
        jllm.generate(model, prompts, **kw)
    assert not any(_is_jax_frame(entry) for entry in e.traceback)
    return str(e.value)


# --- prompts that are bytes -------------------------------------------------------------------

@pytest.mark.parametrize("prompts, name", [
    (b"hello", "prompts is bytes"),
    (bytearray(b"hello"), "prompts is bytearray"),
    (memoryview(b"hello"), "prompts is memoryview"),
    (["fine", b"hello"], "prompt 1 is bytes"),
], ids=["bytes", "bytearray", "memoryview", "bytes_in_list"])
def test_bytes_prompts_are_refused_not_read_as_token_ids(tiny_model, prompts, name):
    msg = _raises(TypeError, name, tiny_model, prompts)
    assert "str or token-id lists" in msg and ".decode('utf-8')" in msg


def test_tokenizer_encode_refuses_bytes(tokenizer):
    with pytest.raises(TypeError, match=r"decode\('utf-8'\)"):
        tokenizer.encode(b"hello")


# --- ~ in paths ---------------------------------------------------------------------------------

def test_load_and_tokenizer_expand_the_home_directory(tiny_checkpoint, tokenizer_path, tiny_model,
                                                      tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    shutil.copytree(tiny_checkpoint, tmp_path / "jllm" / "tiny")
    shutil.copy(tokenizer_path, tmp_path / "tok.model")
    model = jllm.load("~/jllm/tiny", progress=False)
    assert model.cfg == tiny_model.cfg and model.tokenizer is not None
    np.testing.assert_array_equal(np.asarray(model.params.norm), np.asarray(tiny_model.params.norm))
    tok = Tokenizer("~/tok.model")
    assert tok.path == str(tmp_path / "tok.model")
    assert tok.encode("Hello world") == model.tokenizer.encode("Hello world")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        jllm.load("~/missing", progress=False)


def test_load_of_a_file_names_it_and_asks_for_the_directory(tiny_checkpoint):
    """A file (config.json, a safetensors file) where the directory belongs: said so, not
    "does not exist"."""
    path = os.path.join(tiny_checkpoint, "jllm.json")
    with pytest.raises(ValueError, match=f"{path!r} is a file; pass the checkpoint's directory"):
        jllm.load(path, progress=False)


# --- text that is not valid Unicode -------------------------------------------------------------

UNDECODABLE = os.fsdecode(b"abc\xff")   # a command-line argument holding a 0xFF byte: "abc\udcff"


def test_tokenizer_names_the_position_and_character_of_a_lone_surrogate(tokenizer):
    assert UNDECODABLE == "abc\udcff"
    with pytest.raises(ValueError, match=r"'\\udcff' at position 3"):
        tokenizer.encode(UNDECODABLE)


def test_generate_names_the_prompt_with_a_lone_surrogate(tiny_model):
    msg = _raises(ValueError, "prompt 1", tiny_model, ["fine", "ok " + UNDECODABLE])
    assert "position 6" in msg and repr("\udcff") in msg


def test_generate_names_the_stop_string_with_a_lone_surrogate(tiny_model):
    msg = _raises(ValueError, r"stop\[1\]", tiny_model, "Hello", stop=["ok", UNDECODABLE])
    assert "position 3" in msg and repr("\udcff") in msg


# --- argument types and ranges ------------------------------------------------------------------

BAD_ARGUMENTS = [
    (dict(seed="1"), TypeError, "seed='1'"),
    (dict(seed=None), TypeError, "seed=None"),
    (dict(seed=True), TypeError, "seed=True"),
    (dict(seed=1.5), ValueError, "seed=1.5"),
    (dict(seed=-2**31 - 1), ValueError, r"seed=-2147483649 must be an int in \[-2\*\*31, 2\*\*32\)"),
    (dict(seed=2**32), ValueError, "seed=4294967296"),
    (dict(seed=2**64), ValueError, "seed=18446744073709551616"),
    (dict(logit_bias=[1, 2]), TypeError, "logit_bias="),
    (dict(logit_bias={99999: 1.0}), ValueError, r"logit_bias key 99999 must be a token id"),
    (dict(logit_bias={"5": 1.0}), ValueError, "logit_bias key '5'"),
    (dict(logit_bias={5: 101}), ValueError, r"logit_bias\[5\]=101 must be a number in \[-100, 100\]"),
    (dict(logit_bias={i: 1.0 for i in range(301)}), ValueError, "at most 300"),
    (dict(repetition_penalty=0), ValueError, r"repetition_penalty=0 must be a number in \[0.01, 100\]"),
    (dict(repetition_penalty=1e39), ValueError, "repetition_penalty=1e\\+39"),
    (dict(presence_penalty=3), ValueError, r"presence_penalty=3 must be a number in \[-2, 2\]"),
    (dict(stop=5), TypeError, "stop=5"),
    (dict(stop=["a", 5]), TypeError, "stop="),
    (dict(stop=b"\n"), TypeError, "stop="),
    (dict(stop_token_ids=5), TypeError, "stop_token_ids=5"),
    (dict(stop_token_ids="2"), TypeError, "stop_token_ids='2'"),
    (dict(temperature=float("nan")), ValueError, "temperature=nan"),
    (dict(temperature=float("inf")), ValueError, "temperature=inf"),
    (dict(temperature="hot"), TypeError, "temperature='hot'"),
    (dict(top_p=float("nan")), ValueError, "top_p=nan"),
    (dict(top_p=np.float32("inf")), ValueError, "top_p="),
    (dict(top_k=2.0), ValueError, "top_k=2.0"),
    (dict(max_new_tokens="4"), TypeError, "max_new_tokens='4'"),
    # a numpy int past int32 once wrapped in the context check and decoded without end
    (dict(max_new_tokens=np.int32(2**31 - 1)), ValueError, "over the model's context"),
    (dict(max_new_tokens=np.int64(2**63 - 1)), ValueError, "over the model's context"),
    (dict(stream=[]), TypeError, "stream=.* must be a callable"),
]


@pytest.mark.parametrize("kw, error, match", BAD_ARGUMENTS,
                         ids=[f"{k}={v!r:.40}" for kw, _, _ in BAD_ARGUMENTS for k, v in kw.items()])
def test_bad_sampling_arguments_name_the_value(tiny_model, kw, error, match):
    _raises(error, match, tiny_model, [[1, 2]], **kw)


@pytest.mark.parametrize("model", ["~/jllm/llama-2-7b", None, 3])
def test_something_else_where_the_model_belongs_says_to_load_it(model):
    msg = _raises(TypeError, "model=", model, "Hello")
    assert "jllm.load(path)" in msg and type(model).__name__ in msg


def test_bool_token_ids_and_a_draft_that_is_not_a_model_are_refused(tiny_model):
    _raises(TypeError, "prompt 0 must be a str or a list of int token ids", tiny_model, [[True, False]])
    from jllm.speculative import DraftModel
    with pytest.raises(TypeError, match=r"DraftModel\(model='path/to/draft'\).*jllm\.load"):
        DraftModel("path/to/draft")


def test_numpy_scalars_work_like_python_numbers(tiny_model):
    prompt = [[1, 7, 9, 11]]
    py = jllm.generate(tiny_model, prompt, max_new_tokens=N, temperature=0.8, top_k=20,
                       top_p=0.9, seed=3, stop_token_ids=[])
    np_ = jllm.generate(tiny_model, prompt, max_new_tokens=np.int64(N),
                        temperature=np.float32(0.8), top_k=np.int64(20), top_p=np.float32(0.9),
                        seed=np.int64(3), stop_token_ids=np.array([], np.int64))
    assert np_[0].tokens == py[0].tokens and len(py[0].tokens) == N


def test_seeds_at_both_ends_are_accepted_and_a_negative_one_is_it_plus_2_pow_32(tiny_model):
    def run(seed):
        [r] = jllm.generate(tiny_model, [[1, 2]], max_new_tokens=8, temperature=1.0, seed=seed,
                            stop_token_ids=[])
        return r.tokens
    top = run(2**32 - 1)
    assert len(top) == 8 and run(-1) == top and run(-2**31) == run(2**31) != top


# --- compile time in the stats ------------------------------------------------------------------

def test_span_union_counts_overlapping_compile_spans_once():
    spans = [(0.0, 10.0), (2.0, 3.0), (8.0, 12.0), (20.0, 21.0)]
    assert costs.span_seconds(spans, 1.0, 11.0) == pytest.approx(10.0)
    assert costs.span_seconds(spans, -math.inf, math.inf) == pytest.approx(13.0)
    assert costs.span_seconds(spans, 13.0, 19.0) == 0.0
    assert costs.span_seconds([], 0.0, 1.0) == 0.0


def test_compile_time_is_reported_apart_from_ttft_and_decode_speed(tiny_model):
    # A config no other test uses (rope_theta is a static argument): prefill and decode compile.
    cfg = dataclasses.replace(tiny_model.cfg, rope_theta=12345.0)
    model = dataclasses.replace(tiny_model, cfg=cfg)
    kw = dict(max_new_tokens=40, stop_token_ids=[])
    t0 = time.perf_counter()
    [cold] = jllm.generate(model, [[1, 5, 6, 7]], **kw)
    wall = time.perf_counter() - t0
    [warm] = jllm.generate(model, [[1, 5, 6, 7]], **kw)
    assert cold.tokens == warm.tokens
    c, w = cold.stats, warm.stats
    assert c.compile_s > 0.1 and w.compile_s == 0.0
    # Compile time is in neither the TTFT nor the decode time: the three add up to at most the call.
    decode_s = (c.generated_tokens - 1) / c.decode_tokens_per_s
    assert 0 < c.ttft_s < c.compile_s
    assert c.ttft_s + decode_s + c.compile_s <= wall * 1.01
    # Counting decode's compilation would make the cold rate hundreds of times below the warm one.
    assert c.decode_tokens_per_s > w.decode_tokens_per_s / 50


# --- batches that do not fit the device ---------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int8"])
def test_cache_bytes_match_the_arrays_init_cache_makes(tiny_cfg, dtype):
    B, S = 4, 32
    made = sum(x.nbytes for x in jax.tree.leaves(init_cache(tiny_cfg, B, S, dtype)))
    L, G, K = tiny_cfg.n_layers, tiny_cfg.n_kv_heads, tiny_cfg.head_dim
    per_element = 1 + 4 / K if dtype == "int8" else jnp.dtype(dtype).itemsize
    assert costs.cache_bytes(tiny_cfg, B, S, dtype) == made
    assert made == 2 * L * B * S * G * K * per_element + 4 * B   # + 4 * B: lengths


@pytest.mark.parametrize("dp, tp, kv_split", [(2, 2, 2), (2, 4, 1), (1, 2, 2)],
                         ids=["dp2_tp2", "dp2_tp4", "dp1_tp2"])
def test_cache_bytes_on_a_mesh_are_one_devices_shard(tiny_cfg, dp, tp, kv_split):
    # tiny has 2 KV heads: split over tp=2, replicated over tp=4 (rules.kv_heads_rule)
    mesh = AbstractMesh((dp, tp), rules.MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    B, S = 8, 64
    kv = 2 * tiny_cfg.n_layers * B * S * tiny_cfg.n_kv_heads * tiny_cfg.head_dim * 2   # bf16
    assert costs.cache_bytes(tiny_cfg, B, S, "bfloat16", mesh) == kv // (dp * kv_split) + 4 * B // dp


class _FakeDevice:
    def __init__(self, stats):
        self.stats = stats

    def memory_stats(self):
        return self.stats


def test_free_device_bytes_is_the_least_free_and_none_when_unknown():
    devs = [_FakeDevice({"bytes_limit": 1000, "bytes_in_use": 300}),
            _FakeDevice({"bytes_limit": 1000, "bytes_in_use": 600})]
    assert costs.free_device_bytes(devices=devs) == int(400 * costs.FREE_MEMORY_FRACTION)
    assert costs.free_device_bytes(devices=devs + [_FakeDevice(None)]) is None
    assert costs.free_device_bytes(devices=[_FakeDevice({})]) is None


def test_rows_that_fit_is_all_or_the_largest_power_of_two_that_fits():
    def run_bytes(k):   # 10 bytes a prompt
        return 10 * k
    assert costs.rows_that_fit(1000, run_bytes, None) == 1000
    assert costs.rows_that_fit(1000, run_bytes, 10_000) == 1000
    assert costs.rows_that_fit(1000, run_bytes, 9_999) == 512
    assert costs.rows_that_fit(1000, run_bytes, 2_600) == 256
    assert costs.rows_that_fit(1000, run_bytes, 10) == 1
    assert costs.rows_that_fit(1000, run_bytes, 9) == 0


@pytest.fixture
def spy_runs(monkeypatch):
    """Records the padded batch shape [B, T] of every device run of generate."""
    shapes = []
    run = gen._run

    def spy(model, rows, tokens, *args):
        shapes.append(tokens.shape)
        return run(model, rows, tokens, *args)

    monkeypatch.setattr(gen, "_run", spy)
    return shapes


def _fit(monkeypatch, model, rows: int) -> None:
    """Fake the device's free memory so that a run of `rows` prompts (T=16, S=64) just fits."""
    budget = gen._run_bytes(model, rows, 16, 64)
    monkeypatch.setattr(costs, "free_device_bytes", lambda mesh: budget)


def test_a_batch_too_large_for_the_device_runs_in_parts_with_the_same_results(
        tiny_model, monkeypatch, spy_runs):
    prompts = ["Once upon a time", [1, 9, 8, 7, 6], "The function returns"]
    whole_stream, parts_stream = [], []
    whole = jllm.generate(tiny_model, prompts, max_new_tokens=N, stream=whole_stream.append)
    assert spy_runs == [(4, 16)]
    _fit(monkeypatch, tiny_model, 2)
    parts = jllm.generate(tiny_model, prompts, max_new_tokens=N, stream=parts_stream.append)
    assert spy_runs[1:] == [(2, 16), (2, 16)]
    assert [(r.tokens, r.text, r.finish_reason) for r in parts] == \
           [(r.tokens, r.text, r.finish_reason) for r in whole]
    for i in range(3):   # stream indices are the prompts' own
        assert [d.token_ids for d in parts_stream if d.index == i] == \
               [d.token_ids for d in whole_stream if d.index == i]
    assert {d.index for d in parts_stream} == {0, 1, 2}


def test_parts_of_a_split_batch_sample_with_their_own_seeds(tiny_model, monkeypatch, spy_runs):
    _fit(monkeypatch, tiny_model, 2)
    kw = dict(max_new_tokens=N, temperature=1.0, seed=5, stop_token_ids=[])
    first = [r.tokens for r in jllm.generate(tiny_model, [[1, 5, 6]] * 4, **kw)]
    again = [r.tokens for r in jllm.generate(tiny_model, [[1, 5, 6]] * 4, **kw)]
    assert spy_runs == [(2, 16)] * 4
    assert first == again
    assert first[0] != first[2] and first[1] != first[3]   # no repeats across parts


def test_a_prompt_whose_cache_cannot_fit_is_a_clear_error(tiny_model, monkeypatch):
    monkeypatch.setattr(costs, "free_device_bytes", lambda mesh: 1000)
    msg = _raises(ValueError, "GiB of KV cache for 64 positions", tiny_model, "Hello",
                  max_new_tokens=N)
    assert "max_new_tokens" in msg and "kv_cache_dtype='int8'" in msg
