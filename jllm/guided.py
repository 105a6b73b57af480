"""Guided decoding: a grammar restricts every sampled token to those that keep the output a valid
prefix of its language: a JSON schema, any JSON object (OpenAI's JSON mode), a regular expression
or a Lark grammar. The grammar's token masks come from llguidance (the structured-output library
vLLM and SGLang use); this module holds the request's spec (`Guided`), the tokenizer's view that
llguidance needs (`GuideTokenizer`) and one request's matcher state (`Matcher`).

llguidance is optional (the `serve` extra installs it): without it, asking for a grammar is a
ValueError that says what to install.
"""
import collections
import dataclasses
import json
import weakref

import numpy as np

from jllm.streaming import Delta, Row
from jllm.tokenizer import HFTokenizer, Tokenizer

KINDS = ("json_schema", "json_object", "regex", "lark")
COMPILED_KEPT = 64   # grammars a GuideTokenizer keeps compiled
# JSON as `json.dumps` writes it: ", " between items, ": " after keys, no other whitespace (a
# model free to add whitespace may add it forever).
JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _llguidance():
    try:
        import llguidance
    except ImportError:
        raise ValueError("guided decoding (a JSON schema, JSON mode, a regex or a grammar) needs the "
                         "llguidance package: pip install llguidance (or jllm's [serve] extra)") from None
    return llguidance


@dataclasses.dataclass(frozen=True)
class Guided:
    """What a request's output must match. kind: "json_schema" (spec: the schema as JSON text),
    "json_object" (any JSON object; spec empty), "regex" (spec: the pattern, matched whole) or
    "lark" (spec: a Lark grammar with a `start` rule). Use the constructors below."""
    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Guided.kind={self.kind!r}; expected one of {', '.join(KINDS)}")
        if not isinstance(self.spec, str):
            raise TypeError(f"Guided.spec must be a str, not {type(self.spec).__name__}")
        if self.kind != "json_object" and not self.spec:
            raise ValueError(f"Guided({self.kind!r}) needs a non-empty spec")

    @classmethod
    def json_schema(cls, schema: dict | str) -> "Guided":
        """A JSON schema, as a dict or as JSON text (an object)."""
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
        if not isinstance(schema, dict):
            raise TypeError(f"a JSON schema must be an object (dict), got {type(schema).__name__}")
        return cls("json_schema", json.dumps(schema))

    @classmethod
    def json_object(cls) -> "Guided":
        return cls("json_object")

    @classmethod
    def regex(cls, pattern: str) -> "Guided":
        return cls("regex", pattern)

    @classmethod
    def lark(cls, grammar: str) -> "Guided":
        return cls("lark", grammar)

    def grammar(self) -> str:
        """The llguidance grammar of this spec."""
        m = _llguidance().LLMatcher
        if self.kind in ("json_schema", "json_object"):
            schema = json.loads(self.spec) if self.kind == "json_schema" else {"type": "object"}
            return m.grammar_from_json_schema(schema, overrides=JSON_LAYOUT)
        if self.kind == "regex":
            return m.grammar_from_regex(self.spec)
        return m.grammar_from_lark(self.spec)


class GuideTokenizer:
    """A tokenizer as llguidance sees it. A Hugging Face tokenizer.json it reads itself (every id
    that ends generation is its EOS); for SentencePiece: each id's bytes (control pieces marked
    as special, byte-fallback pieces as their byte, ids past the tokenizer empty) and an encoder
    that adds no dummy prefix and keeps every space. Built once per model (~ms per 1k pieces)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int):
        llg = _llguidance()
        self.vocab_size = vocab_size
        self._compiled: collections.OrderedDict = collections.OrderedDict()   # Guided -> a fresh LLMatcher
        if isinstance(tokenizer, HFTokenizer):
            self.lltok = llg.LLTokenizer(tokenizer.to_str(), n_vocab=vocab_size,
                                         eos_token=list(tokenizer.stop_ids) or None)
            return
        from sentencepiece import SentencePieceProcessor, sentencepiece_model_pb2

        sp = tokenizer.sp
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(sp.serialized_model_proto())
        proto.normalizer_spec.add_dummy_prefix = False
        proto.normalizer_spec.remove_extra_whitespaces = False
        raw = SentencePieceProcessor(model_proto=proto.SerializeToString())
        pieces = []
        for i in range(vocab_size):
            if i >= sp.get_piece_size():
                pieces.append(b"")
            elif sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i):
                pieces.append(b"\xff" + sp.id_to_piece(i).encode())
            elif sp.is_byte(i):
                pieces.append(bytes([int(sp.id_to_piece(i)[3:5], 16)]))
            else:
                pieces.append(sp.id_to_piece(i).replace("\u2581", " ").encode())

        class _View:  # what llguidance.TokenizerWrapper reads
            tokens = pieces
            eos_token_id, bos_token_id = tokenizer.eos_id, tokenizer.bos_id
            special_token_ids = [i for i, p in enumerate(pieces) if p[:1] == b"\xff"]

            def __call__(self, text):
                return raw.encode(text.decode("utf-8", "replace") if isinstance(text, bytes) else text)

        self.lltok = llg.LLTokenizer(llg.TokenizerWrapper(_View()), n_vocab=vocab_size)

    def matcher(self, guided: Guided) -> "Matcher":
        """A fresh matcher for one request; ValueError naming the problem for a bad grammar. A
        grammar is compiled once: later requests with the same spec copy its fresh matcher (the
        last COMPILED_KEPT specs are kept)."""
        fresh = self._compiled.get(guided)
        if fresh is None:
            fresh = self._compile(guided)
            self._compiled[guided] = fresh
            if len(self._compiled) > COMPILED_KEPT:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(guided)
        return Matcher(fresh.deep_copy(), self.vocab_size)

    def _compile(self, guided: Guided):
        try:
            grammar = guided.grammar()
        except ValueError as e:
            raise ValueError(f"invalid {guided.kind}: {_one_line(str(e))}") from None
        m = _llguidance().LLMatcher(self.lltok, grammar, log_level=0)
        if m.is_error():
            raise ValueError(f"invalid {guided.kind}: {_one_line(m.get_error())}")
        return m


_VIEWS: "weakref.WeakKeyDictionary[Tokenizer, dict[int, GuideTokenizer]]" = weakref.WeakKeyDictionary()


def guide_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> GuideTokenizer:
    """The GuideTokenizer of a tokenizer and model vocabulary, built once per tokenizer object."""
    views = _VIEWS.setdefault(tokenizer, {})
    if vocab_size not in views:
        views[vocab_size] = GuideTokenizer(tokenizer, vocab_size)
    return views[vocab_size]


def follow(row: Row, matcher: "Matcher", new: list[int], now: float, delta: Delta | None) -> Delta | None:
    """After `row.push(new)`: the grammar takes the tokens the row took. Complete (or, never,
    refusing a token), it ends the row with "stop", also on the last token max tokens allow ->
    the delta, with the text the row held back added when it ends here."""
    if row.finish not in (None, "length"):
        return delta
    if all(matcher.take(t) for t in new[:row.taken]) and not matcher.done:
        return delta
    if row.finish == "length":
        row.finish = "stop"
        return delta
    rest = row.end("stop", now)
    if rest is None:
        return delta
    return rest if delta is None else dataclasses.replace(delta, text=delta.text + rest.text)


def _one_line(error: str, limit: int = 600) -> str:
    """llguidance's error text (the cause often on its last line) as one line of at most limit."""
    text = " ".join(line.strip() for line in error.splitlines() if line.strip())
    return text if len(text) <= limit else text[:limit] + "..."


class Matcher:
    """One request's place in its grammar: the tokens allowed next, and the tokens taken."""

    def __init__(self, m, vocab_size: int):
        self._m, self.vocab_size = m, vocab_size

    def words(self) -> np.ndarray:
        """[ceil(V / 32)] uint32: the tokens that keep the output a valid prefix (EOS once it is
        complete), packed (bit j of word w: token 32 w + j; `sampling.unpack_allowed`)."""
        return np.frombuffer(self._m.compute_bitmask(), "<u4")[:-(-self.vocab_size // 32)]

    def allowed(self) -> np.ndarray:
        """[V] bool: `words` unpacked."""
        bits = self.words().view(np.uint8)
        return np.unpackbits(bits, bitorder="little")[:self.vocab_size].astype(bool)

    def take(self, token: int) -> bool:
        """Advance past a sampled token; False if the grammar refuses it."""
        return self._m.consume_token(int(token))

    @property
    def done(self) -> bool:
        """The output is complete and nothing may follow it (the grammar has ended)."""
        return self._m.is_stopped()
