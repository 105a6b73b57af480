"""jllm.streaming.Row's incremental text against decoding every token from scratch."""
import numpy as np
import pytest

from jllm.streaming import FIX_EVERY, Row


def _byte_ids(tokenizer) -> dict[int, int]:
    """byte value -> id of its byte-fallback piece <0xNN>."""
    sp = tokenizer.sp
    return {int(sp.id_to_piece(i)[3:5], 16): i for i in range(sp.vocab_size())
            if sp.id_to_piece(i).startswith("<0x") and sp.id_to_piece(i).endswith(">")}


def _stream(tokenizer, rng, n: int) -> list[int]:
    """n tokens: ordinary pieces, whole multi-byte characters as byte pieces, and stray bytes."""
    byte = _byte_ids(tokenizer)
    ordinary = [i for i in range(3, tokenizer.sp.vocab_size()) if i not in byte.values()]
    out = []
    while len(out) < n:
        r = rng.random()
        if r < 0.6:
            out.append(int(rng.choice(ordinary)))
        elif r < 0.9:
            out += [byte[b] for b in rng.choice(["é", "€", "😀", "ß", "中"]).encode("utf-8")]
        else:
            out.append(byte[int(rng.integers(0x80, 0x100))])  # a byte that begins or breaks a character
    return out[:n]


def _pushes(tokens: list[int], rng) -> list[list[int]]:
    chunks, i = [], 0
    while i < len(tokens):
        k = int(rng.integers(1, 6))
        chunks.append(tokens[i:i + k])
        i += k
    return chunks


@pytest.mark.parametrize("seed", range(6))
def test_text_equals_a_decode_from_scratch_after_every_push(tokenizer, seed):
    rng = np.random.default_rng(seed)
    prompt, tokens = [1, 300, 301], _stream(tokenizer, rng, 6 * FIX_EVERY + 7)
    row, deltas = Row(0, prompt, tokenizer, [], set(), len(tokens)), []
    for chunk in _pushes(tokens, rng):
        d = row.push(chunk, 0.0)
        deltas.append(d.text if d else "")
        assert row.text == tokenizer.decode_after(prompt[-1], row.tokens)
    assert row.tokens == tokens and row.finish == "length"
    assert "".join(deltas) == row.text
    assert row._fixed > 0  # the text was fixed along the way (what makes it incremental)


@pytest.mark.parametrize("seed", range(6))
def test_stop_strings_cut_where_a_search_of_the_whole_text_would(tokenizer, seed):
    """Stop strings taken from the text itself, so they do occur (sometimes across a fixed
    point, sometimes inside a multi-byte character's bytes): the row stops at the first token whose
    text holds one, with the text cut at the first occurrence, as a full search finds."""
    rng = np.random.default_rng(100 + seed)
    prompt, tokens = [1, 42], _stream(tokenizer, rng, 8 * FIX_EVERY)
    full = tokenizer.decode_after(prompt[-1], tokens)
    a = int(rng.integers(len(full) // 3, len(full) - 4))
    stops = [full[a:a + int(rng.integers(1, 4))], "never-there"]
    row, deltas = Row(0, prompt, tokenizer, stops, set(), len(tokens)), []
    for chunk in _pushes(tokens, rng):
        d = row.push(chunk, 0.0)
        deltas.append(d.text if d else "")
        if row.finish:
            break
    for n in range(1, len(tokens) + 1):  # the reference: the first prefix whose text holds a stop
        text = tokenizer.decode_after(prompt[-1], tokens[:n])
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        if hits:
            break
    assert row.finish == "stop" and row.tokens == tokens[:n]
    assert row.text == text[:min(hits)] == "".join(deltas)


@pytest.mark.parametrize("between", ["eos", "past_the_tokenizer", "space"])
def test_text_is_not_fixed_where_the_next_token_would_lose_its_space(tokenizer, between):
    """The text is fixed (FIX_EVERY) at a token the next one decodes after: after a control
    token or an id the tokenizer lacks, SentencePiece drops the next piece's leading space, which
    the whole text keeps; after a space piece, it drops the spaces that follow."""
    sp = tokenizer.sp
    word = sp.piece_to_id("\u2581the")
    mid = {"eos": tokenizer.eos_id, "past_the_tokenizer": tokenizer.vocab_size,
           "space": sp.piece_to_id("\u2581")}[between]
    tokens = [word] * (FIX_EVERY - 1) + [mid, word]
    row = Row(0, [1, word], tokenizer, [], set(), 100)
    row.push(tokens[:FIX_EVERY], 0.0)  # as generate's decode chunks do: FIX_EVERY tokens, then more
    row.push(tokens[FIX_EVERY:], 0.0)
    whole, before = tokenizer.decode([1, word] + tokens), tokenizer.decode([1, word])
    assert row.text == whole[len(before):]
