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


# --- presence and frequency penalties --------------------------------------------------------

def _penalized_greedy_reference(model, prompt, n, presence, frequency, repetition=1.0, bias=None):
    """Greedy tokens with the penalties, each step a full forward over the sequence so far (no
    cache reuse) and the penalties applied in numpy, in vLLM's order: the logit bias, Hugging
    Face's repetition penalty over the prompt and the output, then OpenAI's presence and
    frequency penalties over the output."""
    import numpy as np
    from jllm.model import forward, init_cache
    seq, out, T = list(prompt), [], len(prompt) + n   # padded to T: one shape, causal attention
    for _ in range(n):
        tokens = np.zeros((1, T), np.int32)
        tokens[0, :len(seq)] = seq
        lg, _ = forward(model.params, tokens, init_cache(model.cfg, 1, T, np.float32), model.cfg)
        lg = np.asarray(lg[0, len(seq) - 1], np.float64)
        counts = np.bincount(out, minlength=lg.shape[0])
        seen = np.isin(np.arange(lg.shape[0]), seq)
        for tok, b in (bias or {}).items():
            lg[tok] += b
        lg = np.where(seen, np.where(lg > 0, lg / repetition, lg * repetition), lg)
        lg = lg - presence * (counts > 0) - frequency * counts
        t = int(np.argmax(lg))
        out.append(t)
        seq.append(t)
    return out


def test_penalties_match_a_step_by_step_reference_and_change_a_repetitive_output(tiny_model_no_tokenizer):
    m, prompt, n = tiny_model_no_tokenizer, [1, 5, 9, 5], 24
    [plain] = jllm.generate(m, [prompt], max_new_tokens=n, stop_token_ids=[])
    assert len(set(plain.tokens)) < n          # a random tiny model repeats itself
    for presence, frequency, repetition in [(0.0, 0.6, 1.0), (1.5, 0.0, 1.0), (-0.5, 0.3, 1.0), (0.0, 0.0, 1.3),
                                            (0.4, 0.2, 0.8)]:
        [out] = jllm.generate(m, [prompt, [2, 3]], max_new_tokens=n, stop_token_ids=[], presence_penalty=presence,
                              frequency_penalty=frequency, repetition_penalty=repetition)[:1]
        assert out.tokens == _penalized_greedy_reference(m, prompt, n, presence, frequency, repetition), \
            (presence, frequency, repetition)
    # The repetition penalty sees the prompt from the first sample (the prefill's): a prompt
    # ending where the plain output repeats a token it holds.
    k = next(k for k in range(1, n) if plain.tokens[k] in plain.tokens[:k]
             and _penalized_greedy_reference(m, prompt + plain.tokens[:k], 1, 0, 0, 3.0)[0] != plain.tokens[k])
    [rep] = jllm.generate(m, [prompt + plain.tokens[:k]], max_new_tokens=4, stop_token_ids=[], repetition_penalty=3.0)
    assert rep.tokens == _penalized_greedy_reference(m, prompt + plain.tokens[:k], 4, 0, 0, 3.0)
    [strong] = jllm.generate(m, [prompt], max_new_tokens=n, stop_token_ids=[], frequency_penalty=2.0)
    assert strong.tokens != plain.tokens and len(set(strong.tokens)) > len(set(plain.tokens))


def test_penalties_count_every_generated_token_up_to_the_last(scripted_model, tokenizer):
    """A bigram model that repeats one token with a logit margin of 64 (D) less the noise of two
    random dot products: the penalties (2 + 2 per count) overtake it after 20-45 counts, at a
    count the step-by-step reference fixes exactly."""
    a, b = _word_pieces(tokenizer, 2)
    model = scripted_model({1: a, a: a, b: b})
    n = 60
    [plain] = jllm.generate(model, [[1]], max_new_tokens=n, stop_token_ids=[])
    assert plain.tokens == [a] * n
    [out] = jllm.generate(model, [[1]], max_new_tokens=n, stop_token_ids=[], presence_penalty=2.0,
                          frequency_penalty=2.0)
    assert out.tokens == _penalized_greedy_reference(model, [1], n, 2.0, 2.0)
    assert out.tokens[0] == a and out.tokens != plain.tokens


def test_logit_bias_bans_forces_and_shifts_tokens_as_the_reference(tiny_model_no_tokenizer):
    m, prompt, n = tiny_model_no_tokenizer, [1, 5, 9, 5], 16
    [plain] = jllm.generate(m, [prompt], max_new_tokens=n, stop_token_ids=[])
    banned = max(set(plain.tokens), key=plain.tokens.count)
    [out] = jllm.generate(m, [prompt], max_new_tokens=n, stop_token_ids=[], logit_bias={banned: -100})
    assert banned not in out.tokens
    [forced] = jllm.generate(m, [prompt], max_new_tokens=n, stop_token_ids=[], logit_bias={7: 100.0})
    assert forced.tokens == [7] * n
    bias = {banned: -3.0, plain.tokens[1]: 2.5, 11: 4.0}
    [mixed] = jllm.generate(m, [prompt], max_new_tokens=n, stop_token_ids=[], logit_bias=bias,
                            presence_penalty=0.5, repetition_penalty=1.2)
    assert mixed.tokens == _penalized_greedy_reference(m, prompt, n, 0.5, 0.0, 1.2, bias)
