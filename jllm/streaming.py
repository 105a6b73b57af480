"""Streaming rules shared by `generate` and the engine: stop ids, stop strings, max tokens, and text
deltas that never split a UTF-8 character or hand out a possible stop-string prefix."""
import dataclasses

from jllm.tokenizer import Tokenizer


@dataclasses.dataclass
class Delta:
    """One streaming event: new text (never a split character) and the new token ids of a row."""
    index: int
    text: str
    token_ids: list[int]
    # generate(logprobs=N): the entries (token_id, logprob, alternatives) of these tokens, and of
    # the stop token that ended the row (a last delta may carry only that); else None.
    logprobs: list | None = None


FIX_EVERY = 16  # tokens decoded anew at most (plus a split character) before their text is fixed


class Row:
    """Host-side state of one prompt: tokens so far, stop checks, streamed text.

    The text is decoded incrementally: once the tokens after the last fixed point reach FIX_EVERY
    and their text ends on a whole character, it is fixed (a later token decodes after it and
    cannot change it), so each new token costs a decode of at most about FIX_EVERY tokens and a
    stop-string search over the new text, not over the whole output."""

    def __init__(self, index: int, prompt: list[int], tokenizer: Tokenizer | None, stop: list[str],
                 stop_ids: set[int], max_new: int):
        self.index, self.prompt, self.stop, self.stop_ids, self.max_new = index, prompt, stop, stop_ids, max_new
        self.tok = tokenizer
        self.tokens: list[int] = []
        self.taken = 0  # how many of the last push's ids it took (a stop id included)
        self.finish: str | None = None
        self.text = "" if self.tok is not None else None
        self.emitted = 0
        self.t_done = 0.0
        self._fixed, self._fixed_text = 0, ""  # the text of tokens[:_fixed], final
        self._searched = 0  # text[:_searched] is final and holds no stop string
        self._longest_stop = max(map(len, stop), default=0)

    def _decoded(self) -> str:
        """The text of the tokens so far as it reads after the prompt."""
        context = self.tokens[self._fixed - 1] if self._fixed else self.prompt[-1]
        tail = self.tok.decode_after(context, self.tokens[self._fixed:])
        text = self._fixed_text + tail
        # Fixed only after a token the next tail can be decoded after (Tokenizer.is_anchor): after a
        # control token or an id past the tokenizer, the tail would lose its leading space.
        if (len(self.tokens) - self._fixed >= FIX_EVERY and not tail.endswith("\ufffd")
                and self.tok.is_anchor(self.tokens[-1])):
            self._fixed, self._fixed_text = len(self.tokens), text
        return text

    def _stop_at(self, text: str) -> int:
        """Where the first stop string begins in text, or -1; only text past what earlier calls
        searched (less a stop string's length) is searched again."""
        start = max(0, self._searched - self._longest_stop + 1)
        cut = min((i for i in (text.find(s, start) for s in self.stop) if i >= 0), default=-1)
        if cut < 0:
            self._searched = len(text.rstrip("\ufffd"))  # a split character may still change
        return cut

    def push(self, new: list[int], now: float) -> Delta | None:
        """Take new token ids; return what to stream (or None), marking the row finished.

        With stop strings the text is checked after every token, so `.tokens` ends at the token
        that completed the stop string and nothing generated after it is kept.
        """
        start = len(self.tokens)
        text = None
        self.taken = 0
        for t in new:
            self.taken += 1
            if t in self.stop_ids:
                self.finish = "stop"
                break
            self.tokens.append(t)
            if self.stop:
                text = self._decoded()
                cut = self._stop_at(text)
                if cut >= 0:
                    text, self.finish = text[:cut], "stop"
                    break
            if len(self.tokens) >= self.max_new:
                self.finish = "length"
                break
        if self.finish:
            self.t_done = now
        fresh = self.tokens[start:]
        if self.tok is None:
            return Delta(self.index, "", fresh) if fresh else None
        if text is None:
            text = self._decoded()
        if self.finish:
            stable = len(text)
        else:  # hold back a split character and anything that may begin a stop string
            stable = len(text.rstrip("\ufffd"))
            hold = max((n for s in self.stop for n in range(1, min(len(s), stable + 1))
                        if text[:stable].endswith(s[:n])), default=0)
            stable -= hold
        self.text = text
        delta = text[self.emitted:stable]
        self.emitted = max(self.emitted, stable)
        return Delta(self.index, delta, fresh) if (delta or fresh) else None

    def end(self, reason: str, now: float) -> Delta | None:
        """Finish the row now (e.g. its grammar is complete) -> the text held back so far, if any."""
        self.finish, self.t_done = reason, now
        if self.tok is None or self.emitted >= len(self.text):
            return None
        delta, self.emitted = self.text[self.emitted:], len(self.text)
        return Delta(self.index, delta, [])
