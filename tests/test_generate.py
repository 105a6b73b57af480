"""generate(): compile counts, stopping, streaming, stats, prompt forms and argument errors.

Shapes are kept to batch 1 or 4, prompt bucket 16 and a 64-slot cache (max_new_tokens <= 40) so
the jitted prefill/decode compile once for most of the module.
"""
import math
import os
import shutil

import numpy as np
import pytest

import jllm
from jllm.config import LlamaConfig
from jllm.generate import Delta, bucket, decode, prefill_program

N = 24  # default max_new_tokens: 16 + 24 + 8 -> a 64-slot cache


def _ids(model, n: int, seed: int = 0) -> list[int]:
    return np.random.default_rng(seed).integers(3, model.cfg.vocab_size, n).tolist()


class Recorder:
    def __init__(self):
        self.deltas: list[Delta] = []

    def __call__(self, delta: Delta) -> None:
        self.deltas.append(delta)

    def text(self, index: int = 0) -> str:
        return "".join(d.text for d in self.deltas if d.index == index)

    def ids(self, index: int = 0) -> list[int]:
        return [t for d in self.deltas if d.index == index for t in d.token_ids]


def _is_jax_frame(entry) -> bool:
    return f"{os.sep}jax{os.sep}" in str(entry.path) or f"{os.sep}jaxlib{os.sep}" in str(entry.path)


# --- compilation ------------------------------------------------------------------------------

def test_bucket_is_a_power_of_two_at_least_the_length():
    assert [bucket(n) for n in (1, 16, 17, 33, 100)] == [16, 16, 32, 64, 128]
    assert bucket(3, minimum=1) == 4


def test_new_prompt_length_and_sampling_values_do_not_recompile(tiny_model):
    m = tiny_model
    jllm.generate(m, [_ids(m, 5)], max_new_tokens=N)
    jllm.generate(m, [_ids(m, 5)], max_new_tokens=N, temperature=1.0)  # sampled: the second program
    jllm.generate(m, [_ids(m, 5)], max_new_tokens=N, temperature=1.0, top_k=2)  # with cuts: the third
    program = prefill_program(tiny_model.params)
    compiled = program._cache_size(), decode._cache_size()
    calls = [dict(prompts=[_ids(m, 9, 1)], temperature=0.8, top_k=20, seed=3),
             dict(prompts=[_ids(m, 16, 2)], temperature=1.3, top_p=0.5, seed=7),
             dict(prompts=[_ids(m, 2, 3)], temperature=0.5, top_k=3, top_p=0.9, seed=11),
             dict(prompts="Hello world", temperature=0.0)]
    for kw in calls:
        [r] = jllm.generate(m, kw.pop("prompts"), max_new_tokens=N, stop_token_ids=[], **kw)
        assert len(r.tokens) == N
    assert (program._cache_size(), decode._cache_size()) == compiled


# --- stopping -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def greedy(tiny_model):
    """A greedy reference completion of a text prompt that never stops early."""
    [r] = jllm.generate(tiny_model, "The quick brown fox", max_new_tokens=40, stop_token_ids=[])
    return r


def test_stop_string_cuts_text_before_it(tiny_model, greedy):
    text = greedy.text
    start = next(i for i in range(8, len(text) - 3)
                 if "\ufffd" not in text[i:i + 3] and text[i:i + 3].strip())
    stop = text[start:start + 3]
    rec = Recorder()
    [r] = jllm.generate(tiny_model, "The quick brown fox", max_new_tokens=40, stop_token_ids=[],
                        stop=[stop, "never appears \u2603"], stream=rec)
    assert r.finish_reason == "stop"
    assert r.text == text[:text.find(stop)]
    assert r.tokens == greedy.tokens[:len(r.tokens)]
    assert rec.text() == r.text and stop not in rec.text()
    assert rec.ids() == r.tokens


def test_stop_token_id_first_token_gives_zero_tokens(tiny_model, greedy):
    [r] = jllm.generate(tiny_model, "The quick brown fox", max_new_tokens=40,
                        stop_token_ids=[greedy.tokens[0]])
    assert (r.tokens, r.text, r.finish_reason) == ([], "", "stop")


def test_stop_token_id_mid_sequence_stops_before_it(tiny_model, greedy):
    i = 5
    while greedy.tokens[i] in greedy.tokens[:i]:
        i += 1
    [r] = jllm.generate(tiny_model, "The quick brown fox", max_new_tokens=40,
                        stop_token_ids=[greedy.tokens[i]])
    assert r.tokens == greedy.tokens[:i] and r.finish_reason == "stop"


@pytest.mark.parametrize("max_new", [1, 9, 16, 17, 40])
def test_max_new_tokens_gives_exactly_that_many_and_length(tiny_model, max_new):
    [r] = jllm.generate(tiny_model, [_ids(tiny_model, 7)], max_new_tokens=max_new, stop_token_ids=[])
    assert len(r.tokens) == max_new and r.finish_reason == "length"
    assert r.stats.generated_tokens == max_new


@pytest.fixture(scope="module")
def piece(tokenizer):
    def get(p: str) -> int:
        i = tokenizer.sp.piece_to_id(p)
        assert tokenizer.sp.id_to_piece(i) == p, f"{p!r} is not in the test vocabulary"
        return i
    return get


@pytest.fixture(scope="module")
def words(tokenizer) -> list[int]:
    """Distinct whole-word pieces ('▁the', '▁of', ...) of the trained test tokenizer."""
    sp = tokenizer.sp
    ids = [i for i in range(sp.vocab_size()) if sp.id_to_piece(i).startswith("\u2581")
           and sp.id_to_piece(i)[1:].isascii() and sp.id_to_piece(i)[1:].isalpha()
           and len(sp.id_to_piece(i)) > 2]
    assert len(ids) >= 12
    return ids


def _chain(prompt_last: int, script: list[int], loop_to: int | None = None) -> dict[int, int]:
    """Bigram table: prompt_last -> script[0] -> script[1] -> ... (-> loop_to)."""
    seq = [prompt_last] + script
    assert len(set(seq)) == len(seq), "a scripted token may appear once"
    table = dict(zip(seq, seq[1:]))
    if loop_to is not None:
        table[seq[-1]] = loop_to
    return table


def _emoji(piece) -> list[int]:
    return [piece(f"<0x{b:02X}>") for b in "\U0001F642".encode()]   # 🙂 as four byte pieces


def test_default_stops_at_eos_and_empty_stop_ids_never_stop(scripted_model, tokenizer, words):
    eos, start = tokenizer.eos_id, words[0]
    script = words[1:4] + [eos]
    model = scripted_model(_chain(start, script, loop_to=words[1]))
    prompt = [tokenizer.bos_id, start]
    [r] = jllm.generate(model, [prompt], max_new_tokens=N)
    assert r.tokens == words[1:4] and r.finish_reason == "stop"
    [r] = jllm.generate(model, [prompt], max_new_tokens=N, stop_token_ids=[])
    assert r.finish_reason == "length" and len(r.tokens) == N
    assert r.tokens == (script * N)[:N]


# --- streaming ----------------------------------------------------------------------------------

def _piece_text(tokenizer, ids: list[int]) -> str:
    """Reference detokenization written out by hand: '▁' is a space, byte pieces are UTF-8 bytes."""
    out = b""
    for i in ids:
        p = tokenizer.sp.id_to_piece(i)
        out += bytes([int(p[3:5], 16)]) if tokenizer.sp.is_byte(i) else p.replace("\u2581", " ").encode()
    return out.decode()


@pytest.mark.parametrize("offset", range(9), ids=lambda k: f"emoji_at={k}")
def test_stream_never_splits_a_multibyte_character(scripted_model, tokenizer, words, piece, offset):
    """🙂 arrives as four byte tokens; wherever they fall against the 8-token decode chunks, no
    delta holds half of it, and the deltas add up to the final text and tokens."""
    start = words[0]
    script = words[1:1 + offset] + _emoji(piece) + [piece("<0xC3>"), piece("<0xA9>")] + words[10:12]
    model = scripted_model(_chain(start, script, loop_to=tokenizer.eos_id))
    rec = Recorder()
    [r] = jllm.generate(model, [[tokenizer.bos_id, start]], max_new_tokens=N, stream=rec)
    assert r.tokens == script and r.finish_reason == "stop"
    assert r.text == _piece_text(tokenizer, script)
    assert "\U0001F642\u00e9" in r.text
    assert all("\ufffd" not in d.text for d in rec.deltas)
    assert rec.text() == r.text and rec.ids() == r.tokens


@pytest.mark.parametrize("stop", ["\U0001F642", "\u00e9", "\U0001F642\u00e9", "zzz\u00e9"])
def test_stream_holds_back_a_possible_stop_string(scripted_model, tokenizer, words, piece, stop):
    start = words[0]
    script = words[1:7] + _emoji(piece) + [piece("<0xC3>"), piece("<0xA9>")] + words[10:12]
    model = scripted_model(_chain(start, script, loop_to=tokenizer.eos_id))
    full = _piece_text(tokenizer, script)
    rec = Recorder()
    [r] = jllm.generate(model, [[tokenizer.bos_id, start]], max_new_tokens=N, stop=stop, stream=rec)
    want = full[:full.find(stop)] if stop in full else full
    assert r.text == want and r.finish_reason == "stop"
    assert rec.text() == want and stop not in rec.text()
    assert all("\ufffd" not in d.text for d in rec.deltas)


def test_text_after_prompt_keeps_the_leading_space(scripted_model, tokenizer, words, piece):
    """The first generated word reads ' the' after the prompt, also when the prompt ends in byte pieces."""
    emoji = _emoji(piece)
    for prompt in ([tokenizer.bos_id, words[0]], [tokenizer.bos_id] + emoji):
        model = scripted_model(_chain(prompt[-1], words[1:3], loop_to=tokenizer.eos_id))
        rec = Recorder()
        [r] = jllm.generate(model, [prompt], max_new_tokens=N, stream=rec)
        assert r.text == _piece_text(tokenizer, words[1:3]) == rec.text()
        assert r.text.startswith(" ")


@pytest.mark.parametrize("seed", range(6))
def test_stream_adds_up_to_the_result_when_sampling(tiny_model, seed):
    rec = Recorder()
    prompts = ["Grüße 🙂", "日本語", "naïve café", "Emoji: ✨"]  # each under 16 tokens
    results = jllm.generate(tiny_model, prompts, max_new_tokens=N, temperature=1.0, seed=seed,
                            stop=["e ", "\u00e9"], stream=rec)
    for i, r in enumerate(results):
        assert rec.text(i) == r.text and rec.ids(i) == r.tokens
        assert "e " not in r.text and "\u00e9" not in r.text
        streamed = ""
        for d in (d for d in rec.deltas if d.index == i):   # every prefix is a prefix of the text
            streamed += d.text
            assert r.text.startswith(streamed)


# --- results ------------------------------------------------------------------------------------

def test_stats_are_present_and_sane(tiny_model):
    prompt = _ids(tiny_model, 11, 4)
    [r] = jllm.generate(tiny_model, [prompt], max_new_tokens=N, stop_token_ids=[])
    s = r.stats
    assert s.prompt_tokens == 11 and s.generated_tokens == len(r.tokens) == N
    assert 0 < s.ttft_s < 60
    assert s.decode_tokens_per_s > 0 and math.isfinite(s.decode_tokens_per_s)


def test_same_seed_same_tokens_when_sampling(tiny_model):
    prompt = [_ids(tiny_model, 6, 5)]
    kw = dict(max_new_tokens=N, temperature=1.0, stop_token_ids=[])
    a = jllm.generate(tiny_model, prompt, seed=1, **kw)[0].tokens
    b = jllm.generate(tiny_model, prompt, seed=1, **kw)[0].tokens
    c = jllm.generate(tiny_model, prompt, seed=2, **kw)[0].tokens
    greedy = jllm.generate(tiny_model, prompt, max_new_tokens=N, stop_token_ids=[])[0].tokens
    assert a == b
    assert a != c and a != greedy


def test_prompt_forms_agree(tiny_model, tokenizer):
    texts = ["Once upon a time", "The function returns"]
    [one] = jllm.generate(tiny_model, texts[0], max_new_tokens=N)
    both = jllm.generate(tiny_model, texts, max_new_tokens=N)
    ids = [tokenizer.encode(t, bos=True) for t in texts]
    as_ids = jllm.generate(tiny_model, ids, max_new_tokens=N)
    [flat] = jllm.generate(tiny_model, ids[0], max_new_tokens=N)   # one prompt as a flat id list
    assert len(both) == len(as_ids) == 2
    assert one.tokens == both[0].tokens == as_ids[0].tokens == flat.tokens
    assert [r.tokens for r in both] == [r.tokens for r in as_ids]
    assert [r.text for r in both] == [r.text for r in as_ids]
    assert one.stats.prompt_tokens == len(ids[0])


def test_token_prompts_without_tokenizer_return_ids_only(tiny_model, tiny_model_no_tokenizer):
    prompt = [_ids(tiny_model, 8, 6)]
    rec = Recorder()
    [r] = jllm.generate(tiny_model_no_tokenizer, prompt, max_new_tokens=N, stream=rec)
    [ref] = jllm.generate(tiny_model, prompt, max_new_tokens=N, stop_token_ids=[])
    assert r.text is None and r.finish_reason == "length"
    assert r.tokens == ref.tokens   # no tokenizer: no EOS, so it never stops on a token
    assert rec.ids() == r.tokens and rec.text() == ""


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("prompts, kw, error, match", [
    ([], {}, ValueError, "non-empty"),
    ("", {}, ValueError, "empty string"),
    ([[]], {}, ValueError, "empty token list"),
    ([[1, 2, 99999]], {}, ValueError, "99999"),
    ([[1, 2]], dict(max_new_tokens=0), ValueError, "max_new_tokens=0"),
    ([[1, 2]], dict(max_new_tokens=2.5), ValueError, "max_new_tokens=2.5"),
    ([[1, 2]], dict(temperature=-0.5), ValueError, "temperature=-0.5"),
    ([[1, 2]], dict(top_p=0.0), ValueError, "top_p=0.0"),
    ([[1, 2]], dict(top_p=1.5), ValueError, "top_p=1.5"),
    ([[1, 2]], dict(top_k=0), ValueError, "top_k=0"),
    ([[1, 2]], dict(stop=[""]), ValueError, "stop="),
    ([[1, 2]], dict(stop_token_ids=["x"]), ValueError, "stop_token_ids="),
    ([1.5], {}, TypeError, "prompt 0"),
    ([[1] * 500], dict(max_new_tokens=20), ValueError, "context of 512"),
], ids=["empty_list", "empty_str", "empty_ids", "id_out_of_vocab", "max_new_0", "max_new_float",
        "temperature_neg", "top_p_0", "top_p_1.5", "top_k_0", "empty_stop", "stop_id_str",
        "float_prompt", "too_long"])
def test_bad_arguments_raise_clear_errors(tiny_model, prompts, kw, error, match):
    kw = {"max_new_tokens": 4, **kw}
    with pytest.raises(error, match=match) as e:
        jllm.generate(tiny_model, prompts, **kw)
    assert not any(_is_jax_frame(entry) for entry in e.traceback)


def test_text_prompt_without_tokenizer_is_refused(tiny_model_no_tokenizer):
    with pytest.raises(ValueError, match="no tokenizer"):
        jllm.generate(tiny_model_no_tokenizer, "hello", max_new_tokens=4)
    with pytest.raises(ValueError, match="stop strings need a tokenizer"):
        jllm.generate(tiny_model_no_tokenizer, [[1, 2]], max_new_tokens=4, stop=["x"])


def test_unknown_config_name_lists_the_known_ones():
    with pytest.raises(KeyError, match="tiny"):
        LlamaConfig.from_name("llama-9-1b")


def test_load_missing_directory_is_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        jllm.load(tmp_path / "nope", progress=False)


@pytest.mark.parametrize("damage, match", [
    ("garbage_meta", "jllm.json"),
    ("no_params", "params"),
    ("no_meta", "not a jllm checkpoint"),
    ("bad_format", "format"),
    ("bad_config", "dim=63"),
    ("truncated_params", "corrupt checkpoint"),
])
def test_load_corrupt_checkpoint_is_value_error(tiny_checkpoint, tmp_path, damage, match):
    path = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, path)
    meta = path / "jllm.json"
    if damage == "garbage_meta":
        meta.write_text("{not json")
    elif damage == "no_params":
        shutil.rmtree(path / "params")
    elif damage == "no_meta":
        meta.unlink()
    elif damage == "bad_format":
        meta.write_text(meta.read_text().replace('"format": 1', '"format": 99'))
    elif damage == "bad_config":
        meta.write_text(meta.read_text().replace('"dim": 64', '"dim": 63'))
    elif damage == "truncated_params":
        for root, _, files in os.walk(path / "params"):
            for f in files:
                p = os.path.join(root, f)
                if os.path.getsize(p) > 1000:
                    with open(p, "r+b") as fh:
                        fh.truncate(100)
    with pytest.raises(ValueError, match=match):
        jllm.load(path, progress=False)


def test_a_model_vocabulary_larger_than_its_tokenizer_generates_text(tokenizer):
    """Ids the tokenizer lacks (a vocabulary of 1024 over 512 pieces, like 32001 over 32000) are
    sampled like any other and have no text: they stop neither the decode nor the stream."""
    from conftest import make_model
    model = make_model(LlamaConfig.from_name("tiny", vocab_size=1024), tokenizer)
    deltas = []
    [r] = jllm.generate(model, ["Hello world"], max_new_tokens=24, temperature=5.0, seed=0,
                        stop_token_ids=[], stream=deltas.append)
    assert any(t >= tokenizer.vocab_size for t in r.tokens)
    prompt = tokenizer.encode("Hello world")
    assert r.text == tokenizer.decode_after(prompt[-1], [t for t in r.tokens if t < tokenizer.vocab_size])
    assert "".join(d.text for d in deltas) == r.text
