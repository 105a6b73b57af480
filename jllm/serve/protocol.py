"""OpenAI request bodies: reading, validation, and OpenAI error objects.

Every problem with a request becomes an `APIError` (HTTP status plus
`{"error": {"message", "type", "param", "code"}}`) whose message names the field and the value,
as OpenAI's API answers: 400 for a bad body, 404 for an unknown model, 413 for a body too large.
"""
import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from jllm.guided import Guided
from jllm.sampling import MAX_LOGIT_BIAS, MAX_LOGPROBS
from jllm.serve.tools import check_tools, forced_name, tool_guide

MAX_BODY_BYTES = 8 << 20   # a longer body is refused (413) before it is parsed
MAX_STOP = 16              # stop strings per request: each is checked after every token
MAX_CHOICES = 64           # choices per request: n, times the prompts of a completions batch

_ERROR_TYPES = {400: "invalid_request_error", 404: "invalid_request_error",
                405: "invalid_request_error", 413: "invalid_request_error",
                429: "rate_limit_error", 500: "server_error", 503: "service_unavailable_error"}


class APIError(Exception):
    """An error answered as an OpenAI error object with an HTTP status."""

    def __init__(self, status: int, message: str, *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    @property
    def type(self) -> str:
        return _ERROR_TYPES.get(self.status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


def _custom(message: str) -> PydanticCustomError:
    # A custom error keeps pydantic's "Value error, " prefix out of the message.
    return PydanticCustomError("value_error", message)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool = False


class _Common(BaseModel):
    """Fields both endpoints take. Unknown fields are ignored; known ones we cannot honour are
    accepted only at their neutral values (checked in `unsupported`)."""
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    model: str
    max_tokens: int | None = Field(None, ge=0)   # 0 only with echo (completions)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=1)              # an extension, as in vLLM
    min_p: float | None = Field(None, ge=0, le=1)      # an extension, as in vLLM
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    stop: Any = Field(None, validate_default=True)
    n: int | None = Field(None, ge=1)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, ge=0.01, le=100)   # an extension, as in vLLM (Hugging Face's)
    logit_bias: Any = Field(None, validate_default=True)
    ignore_eos: bool | None = None                     # an extension, as in vLLM: never stop on EOS
    # OpenAI's structured outputs (on completions too, as vLLM takes it); an extension, as in vLLM:
    # guided_regex and guided_grammar (Lark). At most one of them.
    response_format: Any = Field(None, validate_default=True)
    guided_regex: str | None = Field(None, min_length=1)
    guided_grammar: str | None = Field(None, min_length=1)

    @field_validator("response_format")
    @classmethod
    def _response_format(cls, v: Any) -> Guided | None:
        """{"type": "text"}, {"type": "json_object"} or {"type": "json_schema", "json_schema":
        {"name": ..., "schema": {...}, "strict": ...}} -> the Guided it asks for (None for text)."""
        if v is None:
            return None
        kind = v.get("type") if isinstance(v, dict) else None
        if kind == "text":
            return None
        if kind == "json_object":
            return Guided.json_object()
        if kind == "json_schema":
            spec = v.get("json_schema")
            schema = spec.get("schema") if isinstance(spec, dict) else None
            if not isinstance(schema, dict):
                raise _custom("type 'json_schema' needs json_schema.schema, a JSON schema object, got "
                              f"{_short(spec)}")
            return Guided.json_schema(schema)
        raise _custom("expected {'type': 'text'}, {'type': 'json_object'} or {'type': 'json_schema', "
                      f"'json_schema': {{'schema': ...}}}}, got {_short(v)}")

    @property
    def guided(self) -> Guided | None:
        """What the output must match, from response_format or a guided_* extension."""
        if self.guided_regex is not None:
            return Guided.regex(self.guided_regex)
        if self.guided_grammar is not None:
            return Guided.lark(self.guided_grammar)
        return self.response_format

    @field_validator("logit_bias")
    @classmethod
    def _logit_bias(cls, v: Any) -> dict[int, float]:
        """OpenAI's {"token id": bias in [-100, 100]}, at most MAX_LOGIT_BIAS entries."""
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise _custom(f"expected an object of token id -> bias, got {_short(v)}")
        if len(v) > MAX_LOGIT_BIAS:
            raise _custom(f"at most {MAX_LOGIT_BIAS} entries, got {len(v)}")
        out = {}
        for k, b in v.items():
            if not (isinstance(k, str) and k.isascii() and k.isdigit()) or int(k) in out:
                raise _custom(f"keys are distinct token ids (\"123\"), got {_short(k)}")
            if isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
                raise _custom(f"biases are numbers in [-100, 100], got {_short(b)} for token {k}")
            out[int(k)] = float(b)
        return out

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: Any) -> list[str]:
        if v is None:
            return []
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
            raise _custom(f"expected a string or a list of strings, got {_short(v)}")
        if len(v) > MAX_STOP:
            raise _custom(f"at most {MAX_STOP} stop strings, got {len(v)}")
        if any(not s for s in v):
            raise _custom("stop strings must be non-empty")
        return v

    @property
    def choices_per_prompt(self) -> int:
        return 1 if self.n is None else self.n

    def unsupported(self) -> None:
        """Refuse what this server cannot do rather than silently ignore it."""
        if self.choices_per_prompt > MAX_CHOICES:
            raise bad_request(f"n={self.n}: at most {MAX_CHOICES} choices per request", "n")
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream=true", "stream_options")
        given = [f for f in ("response_format", "guided_regex", "guided_grammar") if getattr(self, f) is not None]
        if len(given) > 1:
            raise bad_request(f"{' and '.join(given)}: at most one output constraint per request", given[1])


class CompletionRequest(_Common):
    prompt: Any
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    echo: bool | None = None
    best_of: int | None = Field(None, ge=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, v: Any) -> list[str | list[int]]:
        """The prompts: a string, a list of token ids, or a batch (a list) of either kind."""
        if isinstance(v, str) or isinstance(v, list) and v and all(_is_id(t) for t in v):
            v = [v]
        elif not isinstance(v, list) or not v or not all(isinstance(p, (str, list)) for p in v):
            if v == []:
                raise _custom("the prompt is an empty list of token ids")
            raise _custom(f"expected a string, a list of int token ids, or a list of either, got {_short(v)}")
        if len(v) > MAX_CHOICES:
            raise _custom(f"at most {MAX_CHOICES} prompts per request, got {len(v)}")
        for i, p in enumerate(v):
            where = "the prompt" if len(v) == 1 else f"prompt {i}"
            if isinstance(p, str) and not p:
                raise _custom(f"{where} is empty")
            if isinstance(p, list) and not (p and all(_is_id(t) for t in p)):
                raise _custom(f"{where} must be a string or a non-empty list of int token ids, got {_short(p)}")
        return v

    def unsupported(self) -> None:
        super().unsupported()
        if self.max_tokens == 0 and not self.echo:
            raise bad_request("max_tokens=0 needs echo=true (the prompt, and its logprobs, are all "
                              "such a request returns)", "max_tokens")
        if self.best_of not in (None, self.choices_per_prompt):
            raise bad_request(f"best_of={self.best_of} is not supported (only best_of = n, here "
                              f"{self.choices_per_prompt}: every sample is returned)", "best_of")
        if len(self.prompt) * self.choices_per_prompt > MAX_CHOICES:
            raise bad_request(f"{len(self.prompt)} prompts x n={self.choices_per_prompt} is "
                              f"{len(self.prompt) * self.choices_per_prompt} choices; at most "
                              f"{MAX_CHOICES} per request", "n")
        if self.suffix:
            raise bad_request("suffix is not supported", "suffix")


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = Field(None, validate_default=True)
    name: str | None = None
    tool_calls: Any = Field(None, validate_default=True)   # an assistant's earlier calls
    tool_call_id: str | None = None                        # a tool message: the call it answers

    @field_validator("tool_calls")
    @classmethod
    def _tool_calls(cls, v: Any) -> list[dict] | None:
        """[{"id", "type": "function", "function": {"name", "arguments": JSON text}}, ...]."""
        if v is None:
            return None
        ok = isinstance(v, list) and all(
            isinstance(c, dict) and isinstance(c.get("function"), dict) and isinstance(c["function"].get("name"), str)
            and isinstance(c["function"].get("arguments", ""), str) for c in v)
        if not ok:
            raise _custom("expected a list of {'id', 'type': 'function', 'function': {'name', 'arguments'}}, "
                          f"got {_short(v)}")
        return [{"id": c.get("id"), "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments", "")}}
                for c in v]

    @field_validator("content")
    @classmethod
    def _content(cls, v: Any) -> str:
        """A string, or a list of text parts ({"type": "text", "text": ...}) joined by newlines."""
        if v is None:
            return ""
        if isinstance(v, str):
            return v
        if isinstance(v, list) and all(isinstance(p, dict) for p in v):
            kinds = [p.get("type") for p in v]
            if any(k != "text" for k in kinds):
                raise _custom(f"only text content parts are supported, got types {kinds}")
            if not all(isinstance(p.get("text"), str) for p in v):
                raise _custom("each text part needs a string 'text'")
            return "\n".join(p["text"] for p in v)
        raise _custom(f"expected a string or a list of text parts, got {_short(v)}")


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: Any = Field(None, validate_default=True)
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None

    @field_validator("tools")
    @classmethod
    def _tools(cls, v: Any) -> list[dict] | None:
        if v is None:
            return None
        try:
            return check_tools(v)
        except ValueError as e:
            raise _custom(str(e)) from None

    @property
    def forced_tools(self) -> bool:
        """The reply must be tool calls (tool_choice "required" or a named function)."""
        return bool(self.tools) and self.tool_choice not in (None, "none", "auto")

    @property
    def auto_tools(self) -> bool:
        """The model may answer with tool calls or text (tool_choice "auto", the default with tools)."""
        return bool(self.tools) and self.tool_choice in (None, "auto")

    @property
    def guided(self) -> Guided | None:
        if self.forced_tools:
            return tool_guide(self.tools, self.tool_choice, self.parallel_tool_calls is not False)
        return super().guided

    def unsupported(self) -> None:
        super().unsupported()
        if self.max_tokens == 0:
            raise bad_request("'max_tokens': expected an int >= 1 (got 0)", "max_tokens")
        if self.top_logprobs is not None and not self.logprobs:
            raise bad_request("top_logprobs needs logprobs=true", "top_logprobs")
        if self.tool_choice is not None:
            try:
                name = forced_name(self.tool_choice)
            except ValueError as e:
                raise bad_request(f"tool_choice: {e}", "tool_choice") from None
            if self.tool_choice != "none" and not self.tools:
                raise bad_request(f"tool_choice={_short(self.tool_choice)} needs tools", "tool_choice")
            if name is not None and name not in [t["function"]["name"] for t in self.tools]:
                raise bad_request(f"tool_choice names {name!r}, which is not among the tools", "tool_choice")
        constraint = next((f for f in ("response_format", "guided_regex", "guided_grammar")
                           if getattr(self, f) is not None), None)
        if self.forced_tools and constraint:
            raise bad_request(f"{constraint} does not combine with a forced tool_choice", constraint)

    @property
    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def _is_id(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


def _short(v: Any, limit: int = 80) -> str:
    text = repr(v)
    return text if len(text) <= limit else text[:limit] + "..."


def _param(loc: tuple) -> str:
    """('messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def decode_json(body: bytes) -> dict:
    """The request body as a JSON object: strict UTF-8 and strict JSON (no NaN), or a 400."""
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise bad_request(f"the request body is not valid UTF-8: byte 0x{body[e.start]:02x} at "
                          f"offset {e.start}") from None
    if not text.strip():
        raise bad_request("the request body is empty; expected a JSON object")

    def no_constant(name: str):
        raise ValueError(f"{name} is not valid JSON")

    try:
        obj = json.loads(text, parse_constant=no_constant)
    except (json.JSONDecodeError, ValueError) as e:
        raise bad_request(f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise bad_request("the request body is not valid JSON here: it nests too deeply") from None
    if not isinstance(obj, dict):
        raise bad_request(f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


def validate(model: type[BaseModel], obj: dict) -> BaseModel:
    """Validate a decoded body; the first problem becomes a 400 naming the field and value."""
    try:
        req = model.model_validate(obj)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        param = _param(err["loc"])
        if err["type"] == "missing":
            raise bad_request(f"{param!r} is required", param) from None
        got = "" if err["type"] == "value_error" else f" (got {_short(err.get('input'))})"
        raise bad_request(f"{param!r}: {err['msg']}{got}", param) from None
    req.unsupported()
    return req
