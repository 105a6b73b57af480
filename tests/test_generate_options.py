"""generate options: stop strings cut text and tokens at the stop; configured prompt buckets."""
import jllm


def _word_pieces(tokenizer, n):
    """n distinct ordinary pieces that start with a space marker and are plain letters."""
    sp = tokenizer.sp
    out = []
    for i in range(3, tokenizer.vocab_size):
        piece = sp.id_to_piece(i)
        if piece.startswith("\u2581") and piece[1:].isalpha() and len(piece) >= 3:
            out.append(i)
        if len(out) == n:
            return out
    raise AssertionError("tokenizer has too few word pieces")


def test_stop_string_inside_a_decode_chunk_ends_tokens_at_the_stop(scripted_model, tokenizer):
    a, b, c, d, e = _word_pieces(tokenizer, 5)
    model = scripted_model({a: b, b: c, c: d, d: e, e: a})
    stop = tokenizer.decode([d]).strip()
    [out] = jllm.generate(model, [[1, a]], max_new_tokens=40, stop=[stop], stop_token_ids=[])
    assert out.finish_reason == "stop"
    assert out.tokens == [b, c, d]
    assert out.text == tokenizer.decode_after(a, [b, c, d]).split(stop)[0]
    assert stop not in out.text


def test_streamed_text_never_shows_a_stop_string_prefix_that_completes(scripted_model, tokenizer):
    a, b, c, d, e = _word_pieces(tokenizer, 5)
    model = scripted_model({a: b, b: c, c: d, d: e, e: a})
    # The stop string spans two tokens: text of c followed by text of d.
    stop = tokenizer.decode_after(b, [c, d])
    seen = []
    [out] = jllm.generate(model, [[1, a]], max_new_tokens=40, stop=[stop], stop_token_ids=[],
                          stream=lambda delta: seen.append(delta.text))
    assert out.finish_reason == "stop" and out.tokens == [b, c, d]
    assert "".join(seen) == out.text
    assert stop.strip() not in "".join(seen)


def test_configured_prompt_buckets_pad_to_the_next_listed_length(tiny_model):
    import dataclasses

    from jllm.generate import prefill_program
    model = dataclasses.replace(tiny_model, prompt_buckets=(24, 48))
    prefill = prefill_program(model.params)
    jllm.generate(model, [list(range(3, 23))], max_new_tokens=2)       # 20 tokens -> 24
    before = prefill._cache_size()
    jllm.generate(model, [list(range(3, 26))], max_new_tokens=2)       # 23 tokens -> 24 again
    assert prefill._cache_size() == before
    jllm.generate(model, [list(range(3, 33))], max_new_tokens=2)       # 30 tokens -> 48: new shape
    assert prefill._cache_size() == before + 1


def test_prompt_buckets_must_be_increasing(tiny_model):
    import dataclasses

    import pytest
    with pytest.raises(ValueError, match="prompt_buckets"):
        dataclasses.replace(tiny_model, prompt_buckets=(48, 24))
