"""Tokenizers (SentencePiece `tokenizer.model`, Hugging Face `tokenizer.json`): text checks, decoding
after a context token, offsets; and the Llama-2 chat format."""
import functools
import itertools
import json
import os
import re

import sentencepiece as spm

from jllm.runtime import json_in

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
_SURROGATE = re.compile("[\ud800-\udfff]")


def check_text(text: str, what: str = "text") -> None:
    """Raise ValueError naming the first character of `text` that has no UTF-8 encoding.

    Those are lone surrogates: what Python makes of bytes that were not UTF-8 (a command-line
    argument's 0xFF byte reads as "\\udcff"). SentencePiece cannot take them.
    """
    bad = _SURROGATE.search(text)
    if bad is not None:
        raise ValueError(f"{what} has an invalid character {bad.group()!r} at position {bad.start()} "
                         f"(a lone surrogate, which is how Python keeps bytes that were not UTF-8)")


class Tokenizer:
    """What the model's users need of a tokenizer; `SentencePieceTokenizer` (Llama-2's
    tokenizer.model) and `HFTokenizer` (a Hugging Face tokenizer.json: Llama-3's byte-level BPE)
    fill it in. `open_tokenizer(path)` picks one by the file."""

    path: str
    bos_id: int | None     # added in front of prompts (None: nothing is)
    eos_id: int | None     # the end of a reply (the chat template's eos_token)
    stop_ids: tuple[int, ...]   # every id that ends generation: eos_id first, then the model's others
    _visible: int | None   # a piece with visible text alone (see decode_after)

    @functools.cached_property
    def _anchors(self) -> dict[int, str]:
        """decode_after's decode of [_visible, context] by context id, made once each."""
        return {}

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        """text -> ids with no BOS/EOS; special-token strings in text stay text."""
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        """ids the tokenizer has -> text; control tokens read as nothing."""
        raise NotImplementedError

    def piece(self, i: int) -> str:
        """The vocabulary entry of id i as the tokenizer stores it."""
        raise NotImplementedError

    def is_special(self, i: int) -> bool:
        """Whether id i is a control token (BOS, EOS, chat markers): no text in a decode."""
        raise NotImplementedError

    def token_bytes(self, i: int) -> bytes:
        """The UTF-8 bytes id i adds mid-text (part of a character for a byte piece); a special
        token's own string."""
        raise NotImplementedError

    def special_tokens(self) -> dict[str, int]:
        """Control-token strings a chat template may write, and their ids."""
        raise NotImplementedError

    def template_tokens(self) -> dict[str, str | None]:
        """bos_token, eos_token, unk_token: the strings a chat template is rendered with."""
        raise NotImplementedError

    def encode_offsets(self, text: str) -> list[int]:
        """Where the text of each id of encode(text, bos=False) begins in text (in characters)."""
        raise NotImplementedError

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}: decode bytes first, "
                            f"e.g. text.decode('utf-8')")
        check_text(text)
        return ([self.bos_id] if bos and self.bos_id is not None else []) + self._encode(text) + (
            [self.eos_id] if eos and self.eos_id is not None else [])

    def _known(self, ids: list[int]) -> list[int]:
        """ids without those the tokenizer lacks: a model's vocabulary may be larger than its
        tokenizer's (e.g. 32001 ids over 32000 pieces), and those ids have no text."""
        n = self.vocab_size
        return ids if not ids or (min(ids) >= 0 and max(ids) < n) else [i for i in ids if 0 <= i < n]

    def decode(self, ids: list[int]) -> str:
        return self._decode(self._known(ids))

    def is_anchor(self, i: int) -> bool:
        """Whether `decode_after` reads text after the id i as it reads mid-text: i is a piece of
        this tokenizer and not a control token (after those, as at the start, a leading space may
        be dropped; mid-text it is kept)."""
        return 0 <= i < self.vocab_size and not self.is_special(i)

    def decode_after(self, context: int | None, ids: list[int]) -> str:
        """Text of `ids` as it reads after the token `context`: a tokenizer may drop the leading
        space of the first piece of a text (SentencePiece does), which would glue a continuation
        to its prompt."""
        ids = self._known(ids)
        if context is None or not self.is_anchor(context):
            return self._decode(ids)
        # SentencePiece drops every leading space up to the first visible character, so a context
        # that is only whitespace ("▁", "▁▁▁▁") decoded first would take the spaces of ids along:
        # decode after a visible piece and the context.
        head = [context] if self._visible is None else [self._visible, context]
        anchor = self._anchors.get(context)
        if anchor is None:   # the same for every decode after this context (a stream's many)
            anchor = self._anchors[context] = self._decode(head)
        text = self._decode(head + ids)
        # A byte piece alone reads as U+FFFD; if `ids` complete its character the anchor is gone.
        return text[len(anchor):] if text.startswith(anchor) else self._decode(ids)

    def decode_offsets(self, ids: list[int]) -> tuple[str, list[int]]:
        """decode(ids) and where each id's text begins in it (in characters); control tokens and
        ids the tokenizer lacks take no width."""
        text = self.decode(ids)
        raw, begins = b"", []
        for i in ids:
            begins.append(len(raw))
            if self.is_anchor(i):
                raw += self.token_bytes(i)
        joined = raw.decode("utf-8", "replace")
        lead = len(joined) - len(text)   # a leading space the decode dropped
        if joined[lead:] != text:        # a decoder that is not a plain join: decode prefix by prefix
            return text, [len(self.decode(ids[:k])) for k in range(len(ids))]
        return text, [max(0, k - lead) for k in _char_offsets(joined, begins)]

    def token_text(self, i: int) -> tuple[str, list[int]]:
        """A token as logprobs show it: its text (bytes that are no whole character as
        'bytes:\\xNN'), and its UTF-8 bytes; an id past the tokenizer as 'token_id:N'."""
        if not 0 <= i < self.vocab_size:
            return f"token_id:{i}", []
        raw = self.token_bytes(i)
        try:
            return raw.decode("utf-8"), list(raw)
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw), list(raw)

    def width(self, i: int) -> int:
        """Characters id i adds to a decode, as far as it alone tells: none for control tokens,
        ids past the tokenizer and parts of a character."""
        if not self.is_anchor(i):
            return 0
        text = self.token_text(i)[0]
        return 0 if text.startswith("bytes:") else len(text)



class SentencePieceTokenizer(Tokenizer):
    """A Llama-2 `tokenizer.model`: BOS added to prompts, byte-fallback pieces decoded as bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.expanduser(os.fspath(path))
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot read the SentencePiece model {self.path!r}: {e}") from None
        self._vocab_size = self.sp.vocab_size()   # read once: a stream asks a few times per token
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.bos_id = None if self.bos_id < 0 else self.bos_id
        self.eos_id = None if self.eos_id < 0 else self.eos_id
        self.stop_ids = () if self.eos_id is None else (self.eos_id,)
        sp = self.sp
        self._visible = next((i for i in range(sp.vocab_size()) if not (
            sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
            and sp.decode([i]).strip()), None)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def piece(self, i: int) -> str:
        return self.sp.id_to_piece(i)

    def is_special(self, i: int) -> bool:
        return self.sp.is_control(i)

    def token_bytes(self, i: int) -> bytes:
        piece = self.sp.id_to_piece(i)
        if self.sp.is_byte(i):          # "<0xE2>": one byte of a character split over pieces
            return bytes([int(piece[3:5], 16)])
        special = self.sp.is_control(i) or self.sp.is_unknown(i)
        return (piece if special else piece.replace("\u2581", " ")).encode("utf-8")

    def token_text(self, i: int) -> tuple[str, list[int]]:
        if 0 <= i < self.vocab_size and self.sp.is_byte(i):   # shown as a byte even where it is ASCII
            value = int(self.sp.id_to_piece(i)[3:5], 16)
            return f"bytes:\\x{value:02x}", [value]
        return super().token_text(i)

    def special_tokens(self) -> dict[str, int]:
        """BOS, EOS, UNK and every other control piece (Mistral's [INST], [/INST], ...), which
        SentencePiece never makes from text: a chat template's written ones become these ids."""
        sp = self.sp
        ids = [i for i in range(sp.get_piece_size()) if sp.is_control(i)] + [sp.unk_id()]
        return {sp.id_to_piece(i): i for i in ids if i >= 0}

    def template_tokens(self) -> dict[str, str | None]:
        sp = self.sp
        return {name: sp.id_to_piece(i) if i >= 0 else None for name, i in
                (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id()))}

    def decode_offsets(self, ids: list[int]) -> tuple[str, list[int]]:
        n = self.sp.vocab_size()
        proto = self.sp.decode_ids_as_proto(self._known(ids))
        begins = iter(_char_offsets(proto.text, [p.begin for p in proto.pieces]))
        out, at = [], 0
        for i in ids:
            at = next(begins) if 0 <= i < n else at
            out.append(at)
        return proto.text, out

    def encode_offsets(self, text: str) -> list[int]:
        check_text(text)
        proto = self.sp.encode_as_proto(text)
        return _char_offsets(text, [p.begin for p in proto.pieces])


def _byte_decoder() -> dict[str, int]:
    """Byte-level BPE's alphabet (GPT-2's): the printable character that stands for each byte."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
            *range(ord("\u00ae"), ord("\u00ff") + 1)]
    shifted = [b for b in range(256) if b not in keep]
    table = {chr(b): b for b in keep}
    table.update({chr(256 + k): b for k, b in enumerate(shifted)})
    return table


def _token_string(value) -> str | None:
    """A tokenizer_config.json special token: a string, or {"content": string, ...}."""
    return value.get("content") if isinstance(value, dict) else value


class HFTokenizer(Tokenizer):
    """A Hugging Face `tokenizer.json` (Llama-3's byte-level BPE, or any `tokenizers` model) with
    the tokenizer_config.json (bos_token, eos_token) and generation_config.json (eos_token_id: the
    ids that end generation; without it config.json's, as transformers' generate reads) beside it.
    Text is not cleaned up after decoding (no `clean_up_tokenization_spaces`): what the model
    wrote, space for space."""

    def __init__(self, path: str | os.PathLike):
        import tokenizers

        self.path = os.path.expanduser(os.fspath(path))
        try:
            self.tok = tokenizers.Tokenizer.from_file(self.path)
        except Exception as e:   # tokenizers raises a bare Exception for a malformed file
            raise ValueError(f"cannot read the Hugging Face tokenizer {self.path!r}: {e}") from None
        self.tok.encode_special_tokens = True   # typed "<|eot_id|>" stays text
        self.tok.no_padding()
        self.tok.no_truncation()
        # Read once: the library rebuilds the whole vocabulary to count it (~3 µs with Llama-3's
        # 128K pieces and 256 added tokens), and a stream asks for it a few times per token.
        self._vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        folder = os.path.dirname(self.path)
        config = json_in(folder, "tokenizer_config.json")
        generation = json_in(folder, "generation_config.json")
        added = self.tok.get_added_tokens_decoder()
        self._special = {t.content: i for i, t in added.items() if t.special}
        self._added = {i: t.content for i, t in added.items()}   # their text is their content
        self._special_ids = frozenset(self._special.values())
        self._tokens = {name: _token_string(config.get(name)) for name in ("bos_token", "eos_token", "unk_token")}
        for name, text in self._tokens.items():
            if text is not None and (not isinstance(text, str) or self.tok.token_to_id(text) is None):
                raise ValueError(f"{os.path.join(folder, 'tokenizer_config.json')!r}: {name}={text!r} "
                                 f"is not a token of {self.path!r}")
        bos, eos = self._tokens["bos_token"], self._tokens["eos_token"]
        # No bos_token named: the special token tokenizer.json's post-processor puts first, which
        # transformers adds (Llama-3's <|begin_of_text|>).
        bos_id = self.tok.token_to_id(bos) if bos is not None else self._post_processor_bos()
        self.bos_id = None if config.get("add_bos_token") is False else bos_id
        source = "generation_config.json"
        if "eos_token_id" not in generation:
            source, generation = "config.json", json_in(folder, "config.json")
        ends = generation.get("eos_token_id")
        ends = [ends] if isinstance(ends, int) else list(ends or [])
        if not all(isinstance(e, int) and not isinstance(e, bool) and 0 <= e < self.vocab_size for e in ends):
            raise ValueError(f"{os.path.join(folder, source)!r}: eos_token_id={ends!r}; "
                             f"expected ids below the tokenizer's {self.vocab_size}")
        self.eos_id = self.tok.token_to_id(eos) if eos is not None else (ends[0] if ends else None)
        self.stop_ids = tuple(dict.fromkeys(([] if self.eos_id is None else [self.eos_id]) + ends))
        spec = json.loads(self.tok.to_str())
        decoder = spec.get("decoder") or {}
        self._bytes_of = _byte_decoder() if decoder.get("type") == "ByteLevel" else None
        # Byte-fallback pieces ("<0xF0>", Llama-2's tokenizer.json) are decoded here, run by run:
        # tokenizers' ByteFallback decoder turns a whole run into U+FFFD when any of it is not a
        # whole character, so a finished "🙂" read as four U+FFFD once the next character's first
        # byte came (a stream would show them).
        self._byte_fallback = (self._bytes_of is None and self.tok.decoder is not None
                               and (spec.get("model") or {}).get("byte_fallback") is True)
        self._visible = next((i for i in range(self.vocab_size) if not self.is_special(i)
                              and self.width(i) and self._decode([i]).strip()), None)

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def to_str(self) -> str:
        """The tokenizer as JSON (what llguidance reads)."""
        return self.tok.to_str()

    def _encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def _decode(self, ids: list[int]) -> str:
        if not self._byte_fallback:
            return self.tok.decode(ids, skip_special_tokens=True)
        pieces: list[str] = []
        for is_byte, run in itertools.groupby((i for i in ids if i not in self._special_ids), self._is_byte):
            run = list(run)
            pieces += ([b"".join(map(self.token_bytes, run)).decode("utf-8", "replace")] if is_byte
                       else [self.tok.id_to_token(i) for i in run])
        return self.tok.decoder.decode(pieces) if pieces else ""

    def _is_byte(self, i: int) -> bool:
        """Whether id i is a byte-fallback piece ("<0xE2>": one byte of a character)."""
        piece = self.tok.id_to_token(i)
        return (piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
                and i not in self._special_ids)

    def _post_processor_bos(self) -> int | None:
        """The special token the post-processor puts before a text, if any."""
        plain = self.tok.encode("a", add_special_tokens=False).ids
        full = self.tok.encode("a", add_special_tokens=True).ids
        return full[0] if full and full[:1] != plain[:1] and full[0] in self._special_ids else None

    def piece(self, i: int) -> str:
        return self.tok.id_to_token(i)

    def is_special(self, i: int) -> bool:
        return i in self._special_ids

    def token_bytes(self, i: int) -> bytes:
        piece = self.tok.id_to_token(i)
        if i in self._added:   # special or not, an added token is its content (no byte mapping)
            return self._added[i].encode("utf-8")
        if self._bytes_of is not None:
            return bytes(self._bytes_of.get(ch, 0) for ch in piece)
        if self._is_byte(i):   # byte fallback
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def special_tokens(self) -> dict[str, int]:
        return dict(self._special)

    def template_tokens(self) -> dict[str, str | None]:
        return dict(self._tokens)

    def encode_offsets(self, text: str) -> list[int]:
        check_text(text)
        return [begin for begin, _ in self.tok.encode(text, add_special_tokens=False).offsets]


TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")   # in this order of preference


def find_tokenizer(folder: str) -> str | None:
    """The tokenizer file of a model directory (tokenizer.model, else tokenizer.json), or None.
    With both, tokenizer.json where the tokenizer.model is no SentencePiece model (Llama-3's
    tiktoken file) or where tokenizer.json has tokens past its pieces: a fine-tune's added chat
    tokens ("<|im_end|>"), which transformers reads from it and which the tokenizer.model would
    leave as text (its template's turns) or as no text at all (its EOS)."""
    found = [p for p in (os.path.join(folder, n) for n in TOKENIZER_FILES) if os.path.isfile(p)]
    if len(found) == 2 and _prefer_json(*found):
        return found[1]
    return next(iter(found), None)


def _prefer_json(model: str, tokenizer_json: str) -> bool:
    """Whether tokenizer_json, not the SentencePiece `model`, is the directory's tokenizer: the
    model cannot be read as SentencePiece, or tokenizer_json adds ids past its pieces (False
    where tokenizer_json cannot be read: loading the model names any problem)."""
    try:
        n = spm.SentencePieceProcessor(model_file=model).get_piece_size()
    except (OSError, RuntimeError):
        return True
    try:
        with open(tokenizer_json, encoding="utf-8") as f:
            added = json.load(f).get("added_tokens") or []
        return any(isinstance(t, dict) and isinstance(t.get("id"), int) and t["id"] >= n for t in added)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return False


def open_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A SentencePiece `*.model`, or a Hugging Face `tokenizer.json` (its configs read beside it)."""
    path = os.fspath(path)
    return HFTokenizer(path) if path.endswith(".json") else SentencePieceTokenizer(path)


def format_chat(messages: list[dict], tokenizer: Tokenizer) -> list[int]:
    """Llama-2 chat prompt: [{"role": "system"|"user"|"assistant", "content": str}, ...] -> ids.

    Each finished turn is `<s>[INST] user [/INST] answer </s>`; the system prompt sits inside the
    first user turn between <<SYS>> markers; the prompt ends with the open last user turn.
    """
    if isinstance(messages, (str, bytes)):
        raise TypeError(f"messages={messages!r:.80} must be a list of {{'role', 'content'}} dicts")
    if not messages:
        raise ValueError("format_chat needs at least one message")
    msgs = list(messages)
    for i, m in enumerate(msgs):
        if not (isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)):
            raise TypeError(f"message {i} is {m!r:.80}; expected a dict with str 'role' and 'content'")
    roles = [m["role"] for m in msgs]  # as given, for the error
    if msgs[0]["role"] == "system":
        if len(msgs) < 2:
            raise ValueError("a system message must be followed by a user message")
        if msgs[1]["role"] != "user":  # checked before its content joins the system prompt
            raise ValueError(f"chat roles must alternate user/assistant and end with user; got {roles}")
        msgs = [{"role": "user", "content": B_SYS + msgs[0]["content"] + E_SYS + msgs[1]["content"]}
                ] + msgs[2:]
    expected = ["user", "assistant"] * (len(msgs) // 2) + ["user"] * (len(msgs) % 2)
    if [m["role"] for m in msgs] != expected or expected[-1] != "user":
        raise ValueError(f"chat roles must alternate user/assistant and end with user; got {roles}")
    ids: list[int] = []
    for user, answer in zip(msgs[:-1:2], msgs[1::2]):
        ids += tokenizer.encode(f"{B_INST} {user['content'].strip()} {E_INST} "
                                f"{answer['content'].strip()} ", bos=True, eos=True)
    return ids + tokenizer.encode(f"{B_INST} {msgs[-1]['content'].strip()} {E_INST}", bos=True)


def _char_offsets(text: str, byte_offsets: list[int]) -> list[int]:
    """UTF-8 byte offsets into text -> character offsets (a byte inside a character: that character)."""
    char_at = []
    for k, ch in enumerate(text):
        char_at += [k] * len(ch.encode("utf-8"))
    char_at.append(len(text))
    return [char_at[min(b, len(char_at) - 1)] for b in byte_offsets]
