"""OpenAI response bodies and stream chunks for /v1/completions and /v1/chat/completions."""
import json
import math

from jllm.tokenizer import Tokenizer

LOGPROB_FLOOR = -9999.0  # what OpenAI reports for a token with (numerically) zero probability


def sse(obj: dict | str) -> str:
    """One Server-Sent Event as OpenAI sends it: `data: {json}` and a blank line."""
    data = obj if isinstance(obj, str) else json.dumps(obj, ensure_ascii=False, allow_nan=False)
    return f"data: {data}\n\n"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def token_text(tokenizer: Tokenizer | None, token_id: int) -> tuple[str, list[int]]:
    """A token as logprobs show it: its text (a part of a character as 'bytes:\\xNN') and its UTF-8 bytes."""
    return (f"token_id:{token_id}", []) if tokenizer is None else tokenizer.token_text(token_id)


def _finite(logprob: float) -> float:
    return float(logprob) if math.isfinite(logprob) else LOGPROB_FLOOR


def chat_logprobs(entries: list, tokenizer: Tokenizer | None) -> dict:
    """Engine logprobs [(token_id, logprob, [(alt_id, alt_logprob), ...]), ...] -> chat's form."""
    content = []
    for token_id, logprob, top in entries:
        text, raw = token_text(tokenizer, token_id)
        alts = []
        for alt_id, alt_logprob in top:
            alt_text, alt_raw = token_text(tokenizer, alt_id)
            alts.append({"token": alt_text, "logprob": _finite(alt_logprob), "bytes": alt_raw})
        content.append({"token": text, "logprob": _finite(logprob), "bytes": raw, "top_logprobs": alts})
    return {"content": content, "refusal": None}


def completion_logprobs(entries: list, tokenizer: Tokenizer | None, offset: int,
                        offsets: list[int] | None = None, end: int | None = None) -> dict:
    """Engine logprobs -> the legacy completions form. text_offset is `offsets` where given, else
    it counts from `offset` by what each token adds to the text, never past `end` (the end of the
    text these tokens came with). An entry (token_id, None, None) is a token nothing predicts (an
    echoed prompt's first): null logprobs."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for k, (token_id, logprob, top) in enumerate(entries):
        text, _ = token_text(tokenizer, token_id)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if logprob is None else _finite(logprob))
        out["top_logprobs"].append(None if top is None else {token_text(tokenizer, a)[0]: _finite(lp) for a, lp in top})
        out["text_offset"].append(offsets[k] if offsets is not None else offset if end is None else min(offset, end))
        offset += 0 if tokenizer is None else tokenizer.width(token_id)
    return out


def completion_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None,
                      token_ids: list[int] | None = None) -> dict:
    choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}
    if token_ids is not None:   # a model without a tokenizer: its output is token ids (extension)
        choice["token_ids"] = token_ids
    return choice


def completion(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def completion_chunk(rid: str, created: int, model: str, text: str, finish_reason: str | None,
                     logprobs: dict | None, with_usage: bool, token_ids: list[int] | None = None,
                     index: int = 0) -> dict:
    body = {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [completion_choice(index, text, finish_reason, logprobs, token_ids)]}
    if with_usage:   # OpenAI sends "usage": null on every chunk but the last when asked for usage
        body["usage"] = None
    return body


def chat_choice(index: int, message: dict, finish_reason: str | None, logprobs: dict | None) -> dict:
    return {"index": index, "message": message, "logprobs": logprobs, "finish_reason": finish_reason}


def chat(rid: str, created: int, model: str, choices: list[dict], usage_: dict) -> dict:
    return {"id": rid, "object": "chat.completion", "created": created, "model": model,
            "choices": choices, "usage": usage_}


def chat_chunk(rid: str, created: int, model: str, delta: dict, finish_reason: str | None,
               logprobs: dict | None, with_usage: bool, index: int = 0) -> dict:
    body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs,
                         "finish_reason": finish_reason}]}
    if with_usage:
        body["usage"] = None
    return body


def usage_chunk(rid: str, created: int, model: str, obj: str, usage_: dict) -> dict:
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [],
            "usage": usage_}
