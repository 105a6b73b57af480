import pytest

from jllm.streaming import Row
from jllm.tokenizer import SentencePieceTokenizer as Tokenizer, format_chat

TEXTS = ["Hello world", "Grüße aus Köln, déjà vu.", "日本語のテキスト", "Emoji: 🙂🚀✨",
         "x = f(a, b) + 42"]


def _bytes(tok: Tokenizer, text: str) -> list[int]:
    return [tok.sp.piece_to_id(f"<0x{b:02X}>") for b in text.encode()]


def test_special_ids_are_llama_layout(tokenizer):
    assert (tokenizer.sp.unk_id(), tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
    assert tokenizer.vocab_size == 512


def test_encode_adds_bos_and_optional_eos(tokenizer):
    plain = tokenizer.sp.encode("Hello world")
    assert tokenizer.encode("Hello world") == [tokenizer.bos_id] + plain
    assert tokenizer.encode("Hello world", bos=False) == plain
    assert tokenizer.encode("Hello world", eos=True)[-1] == tokenizer.eos_id


@pytest.mark.parametrize("text", TEXTS)
def test_decode_round_trip(tokenizer, text):
    assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode(text, bos=False, eos=True)) == text


@pytest.mark.parametrize("char", ["\u00e9", "\u65e5", "\U0001F642"], ids=["2_bytes", "3_bytes", "4_bytes"])
def test_byte_fallback_pieces_decode_to_utf8(tokenizer, char):
    ids = _bytes(tokenizer, char)
    assert all(tokenizer.sp.is_byte(i) for i in ids)
    assert tokenizer.decode(ids) == char
    assert tokenizer.decode(ids[:-1]) and char not in tokenizer.decode(ids[:-1])   # incomplete


def test_unseen_character_encodes_as_byte_pieces(tokenizer):
    ids = tokenizer.encode("\U0001F642", bos=False)
    assert any(tokenizer.sp.is_byte(i) for i in ids)
    assert tokenizer.decode(ids) == "\U0001F642"


def test_decode_after_keeps_the_space_between_prompt_and_continuation(tokenizer):
    prompt = tokenizer.encode("Hello", bos=True)
    cont = tokenizer.encode(" world", bos=False)
    assert tokenizer.decode(prompt + cont) == "Hello world"
    assert tokenizer.decode_after(prompt[-1], cont) == " world"
    assert tokenizer.decode_after(prompt[-1], []) == ""
    after_bytes = _bytes(tokenizer, "\U0001F642")
    assert tokenizer.decode_after(after_bytes[-1], cont) == " world"


def test_decode_after_a_space_piece_keeps_the_spaces_that_follow(tokenizer):
    """After a whitespace-only piece ("▁"; Llama's "▁▁▁▁" indentation), the text reads as it
    does inside the whole decode: SentencePiece drops every leading space of a text, so the space
    piece decoded first would take the continuation's leading space along."""
    space, word = tokenizer.sp.piece_to_id("\u2581"), tokenizer.sp.piece_to_id("\u2581the")
    prompt = tokenizer.encode("Hello", bos=True) + [space]
    for cont in ([word], [space, word], [space, space]):
        whole, before = tokenizer.decode(prompt + cont), tokenizer.decode(prompt)
        assert tokenizer.decode_after(prompt[-1], cont) == whole[len(before):]
    assert tokenizer.decode_after(prompt[-1], [word]) == " the"


def test_stream_deltas_never_split_a_character(tokenizer):
    """The streaming rules (jllm.streaming.Row, shared by generate and the engine): token by token,
    no delta holds a half-decoded character, and together they are the whole text."""
    sp = tokenizer.sp
    ids = (sp.encode("naïve") + [sp.piece_to_id("\u2581")] + _bytes(tokenizer, "\U0001F642\u65e5")
           + sp.encode(" end"))
    row = Row(0, [tokenizer.bos_id], tokenizer, stop=[], stop_ids=set(), max_new=len(ids))
    deltas = [d.text for d in (row.push([i], 0.0) for i in ids) if d is not None]
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == "naïve \U0001F642\u65e5 end"


def test_bad_tokenizer_file_is_value_error(tmp_path):
    path = tmp_path / "tokenizer.model"
    path.write_bytes(b"not a sentencepiece model")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer(path)


# --- Llama-2 chat format ------------------------------------------------------------------------

def test_chat_single_user_turn(tokenizer):
    ids = format_chat([{"role": "user", "content": " Hi there "}], tokenizer)
    assert ids == [tokenizer.bos_id] + tokenizer.sp.encode("[INST] Hi there [/INST]")


def test_chat_system_prompt_goes_inside_the_first_user_turn(tokenizer):
    ids = format_chat([{"role": "system", "content": "Be brief."},
                       {"role": "user", "content": "Hi"}], tokenizer)
    assert ids == [tokenizer.bos_id] + tokenizer.sp.encode(
        "[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST]")


def test_chat_each_finished_turn_has_bos_and_eos(tokenizer):
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "u1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
            {"role": "assistant", "content": "a2"}, {"role": "user", "content": "u3"}]
    ids = format_chat(msgs, tokenizer)
    bos, eos, enc = tokenizer.bos_id, tokenizer.eos_id, tokenizer.sp.encode
    assert ids == ([bos] + enc("[INST] <<SYS>>\nS\n<</SYS>>\n\nu1 [/INST] a1 ") + [eos]
                   + [bos] + enc("[INST] u2 [/INST] a2 ") + [eos]
                   + [bos] + enc("[INST] u3 [/INST]"))
    assert ids.count(bos) == 3 and ids.count(eos) == 2 and ids[-1] != eos


@pytest.mark.parametrize("roles", [
    [],
    ["assistant"],
    ["system"],
    ["user", "user"],
    ["user", "assistant"],
    ["system", "assistant", "user"],
    ["user", "system"],
    ["user", "assistant", "assistant", "user"],
], ids=lambda r: "-".join(r) or "empty")
def test_chat_refuses_bad_role_order(tokenizer, roles):
    with pytest.raises(ValueError):
        format_chat([{"role": r, "content": "x"} for r in roles], tokenizer)


@pytest.mark.parametrize("message", [{"role": "user", "content": b"hi"}, {"role": "user", "content": None},
                                     {"role": "user"}, {"content": "hi"}, "hi"],
                         ids=["bytes_content", "none_content", "no_content", "no_role", "str"])
def test_chat_message_that_is_not_a_role_and_str_content_is_a_type_error(tokenizer, message):
    """Bytes content was formatted as its repr ("[INST] b'hi' [/INST]") without a word."""
    with pytest.raises(TypeError, match="message 0 is .*expected a dict with str 'role' and 'content'"):
        format_chat([message], tokenizer)
    with pytest.raises(TypeError, match="messages='hi' must be a list"):
        format_chat("hi", tokenizer)


def test_chat_role_error_names_the_roles_as_given(tokenizer):
    """A system message followed by an assistant's: the roles passed in, not those after the
    system prompt joined the next message."""
    msgs = [{"role": r, "content": "x"} for r in ("system", "assistant", "user")]
    with pytest.raises(ValueError, match=r"got \['system', 'assistant', 'user'\]"):
        format_chat(msgs, tokenizer)


def test_ids_past_the_tokenizer_decode_to_nothing(tokenizer):
    """A model's vocabulary may be larger than its tokenizer's (32001 ids over 32000 pieces): ids
    the tokenizer lacks have no text, and never stop a decode or a stream."""
    n = tokenizer.vocab_size
    ids = tokenizer.encode("Hello world", bos=False)
    assert tokenizer.decode(ids[:1] + [n, n + 5] + ids[1:]) == tokenizer.decode(ids)
    assert tokenizer.decode_after(n, ids) == tokenizer.decode(ids)
    assert tokenizer.decode_after(ids[0], [n] + ids[1:]) == tokenizer.decode_after(ids[0], ids[1:])


def test_a_templates_control_pieces_become_their_ids(tmp_path):
    """A SentencePiece model with control pieces, as Mistral's v3 tokenizer holds [INST] and
    [/INST]: the ones a chat template writes become their ids (SentencePiece never makes them from
    text); the same strings typed in a message stay text."""
    from convert.tiny import train_tokenizer
    from jllm.chat import ChatTemplate
    path = str(tmp_path / "tokenizer.model")
    train_tokenizer(path, 512, control_symbols=("[INST]", "[/INST]"))
    tok = Tokenizer(path)
    inst, end = tok.special_tokens()["[INST]"], tok.special_tokens()["[/INST]"]
    assert (inst, end) == (3, 4) and tok.is_special(inst) and tok.decode([inst, end]) == ""
    assert inst not in tok.encode("[INST] hi [/INST]", bos=False)  # text never makes a control piece
    template = ChatTemplate("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] "
                            "{{ m['content'] }}[/INST]{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}"
                            "{% endfor %}", tok)
    ids = template.encode([{"role": "user", "content": "say [INST] twice"}, {"role": "assistant", "content": "ok"},
                           {"role": "user", "content": "again"}])
    assert ids.count(inst) == 2 and ids.count(end) == 2 and ids.count(tok.eos_id) == 1 and ids[0] == tok.bos_id
    assert tok.decode(ids).count("[INST]") == 1  # the typed one, as text
