"""SentencePiece tokenizer (text checks, decoding after a context token) and the Llama-2 chat format."""
import os
import re

import sentencepiece as spm

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
    """A Llama-2 `tokenizer.model`: BOS added to prompts, byte-fallback pieces decoded as bytes."""

    def __init__(self, path: str | os.PathLike):
        self.path = os.path.expanduser(os.fspath(path))
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.path)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"cannot read the SentencePiece model {self.path!r}: {e}") from None
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        # A piece with visible text alone (not a control, unknown, unused or byte piece): what
        # `decode_after` decodes first, so that the text after it reads as mid-text.
        sp = self.sp
        self._visible = next((i for i in range(sp.vocab_size()) if not (
            sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i) or sp.is_byte(i))
            and sp.decode([i]).strip()), None)

    @property
    def vocab_size(self) -> int:
        return self.sp.vocab_size()

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}: decode bytes first, "
                            f"e.g. text.decode('utf-8')")
        check_text(text)
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def _known(self, ids: list[int]) -> list[int]:
        """ids without those the tokenizer lacks: a model's vocabulary may be larger than its
        tokenizer's (e.g. 32001 ids over 32000 pieces), and those ids have no text."""
        n = self.sp.vocab_size()
        return ids if all(0 <= i < n for i in ids) else [i for i in ids if 0 <= i < n]

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode(self._known(ids))

    def decode_offsets(self, ids: list[int]) -> tuple[str, list[int]]:
        """decode(ids) and where each id's text begins in it (in characters); control tokens and
        ids the tokenizer lacks take no width."""
        n = self.sp.vocab_size()
        proto = self.sp.decode_ids_as_proto(self._known(ids))
        begins = iter(_char_offsets(proto.text, [p.begin for p in proto.pieces]))
        out, at = [], 0
        for i in ids:
            at = next(begins) if 0 <= i < n else at
            out.append(at)
        return proto.text, out

    def encode_offsets(self, text: str) -> list[int]:
        """Where the text of each id of encode(text, bos=False) begins in text (in characters)."""
        check_text(text)
        proto = self.sp.encode_as_proto(text)
        return _char_offsets(text, [p.begin for p in proto.pieces])

    def is_anchor(self, i: int) -> bool:
        """Whether `decode_after` reads text after the id i as it reads mid-text: i is a piece of
        this tokenizer and not a control token (after those, as at the start, a leading space is
        dropped; mid-text SentencePiece keeps it)."""
        return 0 <= i < self.sp.vocab_size() and not self.sp.is_control(i)

    def decode_after(self, context: int | None, ids: list[int]) -> str:
        """Text of `ids` as it reads after the token `context`: SentencePiece drops the leading
        space of the first piece of a sequence, which would glue a continuation to its prompt."""
        ids = self._known(ids)
        if context is None or not self.is_anchor(context):
            return self.sp.decode(ids)
        # SentencePiece drops every leading space up to the first visible character, so a context
        # that is only whitespace ("▁", "▁▁▁▁") decoded first would take the spaces of ids along:
        # decode after a visible piece and the context.
        head = [context] if self._visible is None else [self._visible, context]
        anchor, text = self.sp.decode(head), self.sp.decode(head + ids)
        # A byte piece alone reads as U+FFFD; if `ids` complete its character the anchor is gone.
        return text[len(anchor):] if text.startswith(anchor) else self.sp.decode(ids)


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
