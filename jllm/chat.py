"""Chat prompts (`jllm chat`, `jllm serve`): a Hugging Face `chat_template` rendered as
transformers renders it, else Llama-2's.

A checkpoint directory may carry the `tokenizer_config.json` of the Hugging Face model it was
converted from; its `chat_template` (jinja2) is rendered in a sandbox with the settings and
helpers transformers' `apply_chat_template` uses. The rendered text is then tokenized with the
special tokens the template wrote (`<s>`, `</s>`) as their ids; the same strings typed inside a
message stay text, so a user cannot forge a turn boundary.
"""
import datetime
import json
import os
import re

import jinja2
import jinja2.ext
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from jllm.hf import read_tokenizer_config
from jllm.tokenizer import Tokenizer, format_chat

# Private-use markers around special-token strings found in messages (transformers uses the same).
_MARK_START, _MARK_END = "\U000f0000", "\U000f0001"


def read_template(model_dir: str) -> str | None:
    """The `chat_template` of DIR/tokenizer_config.json, or None when there is none.

    A list of named templates (the newer transformers form) gives its "default" one.
    """
    found = read_tokenizer_config(model_dir)
    if found is None:
        return None
    path, config = found
    template = config.get("chat_template")
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        if "default" not in named:
            raise ValueError(f"{path!r} lists chat templates {sorted(map(str, named))} but none "
                             "is named 'default'")
        template = named["default"]
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{path!r}: chat_template must be a string, got {type(template).__name__}")
    return template


def template_source(model_dir: str, override: str | None = None) -> str | None:
    """The chat template to use: `override` (`--chat-template`: a file holding one, or the
    template itself) where given, else the checkpoint's (`read_template`); None for Llama-2's
    format. ValueError for an override that is neither, or a file that cannot be read."""
    if override is None:
        return read_template(model_dir) if os.path.isdir(model_dir) else None
    path = os.path.expanduser(override)
    if os.path.isfile(path):
        try:
            with open(path, encoding="utf-8") as f:
                return f.read()
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"--chat-template {override!r}: cannot read it: {e}") from None
    if "{{" in override or "{%" in override:
        return override
    raise ValueError(f"--chat-template {override!r} is neither a file nor a jinja2 template")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # jinja's own tojson escapes HTML characters; transformers' does not.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.datetime.now().strftime(fmt)


def compile_template(source: str) -> jinja2.Template:
    """A chat_template compiled in the sandbox transformers renders it in (ValueError if it
    does not compile)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"the chat_template does not compile: {e} (line {e.lineno})") from None


class ChatTemplate:
    """A compiled `chat_template` and the special tokens it is rendered with."""

    def __init__(self, source: str, tokenizer: Tokenizer):
        self.source, self.template = source, compile_template(source)
        env = ImmutableSandboxedEnvironment(extensions=[jinja2.ext.loopcontrols])
        # The template reads `tools` from its context (renders tool definitions itself).
        self.takes_tools = "tools" in jinja2.meta.find_undeclared_variables(env.parse(source))
        self.tokenizer = tokenizer
        # Those the tokenizer lacks are undefined, as in transformers (not rendered as "None").
        self.special = {k: v for k, v in tokenizer.template_tokens().items() if v is not None}
        self.control_ids = tokenizer.special_tokens()
        pattern = "|".join(map(re.escape, sorted(self.control_ids, key=len, reverse=True)))
        self._control = re.compile(pattern)
        self._split = re.compile(f"{_MARK_START}({pattern}){_MARK_END}|({pattern})")

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list | None = None) -> str:
        """The prompt text, as transformers' apply_chat_template(..., tokenize=False) gives it."""
        return self.template.render(messages=messages, tools=tools, documents=None,
                                    add_generation_prompt=add_generation_prompt, **self.special)

    def encode(self, messages: list[dict], tools: list | None = None) -> list[int]:
        """Render and tokenize: template-written special tokens become ids, typed ones stay text."""
        marked = [{k: v if k == "role" else self._mark_all(v) for k, v in m.items()} for m in messages]
        text = self.render(marked, tools=None if tools is None else self._mark_all(tools))
        ids: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            ids += self._text_ids(text[pos:m.start()])
            if m.group(1) is not None:   # a marked (typed) special token: plain text
                ids += self._text_ids(m.group(1))
            else:
                ids.append(self.control_ids[m.group(2)])
            pos = m.end()
        return ids + self._text_ids(text[pos:])

    def _mark_all(self, value):
        """Every string in value (a message's content and tool calls, the tools) marked."""
        if isinstance(value, str):
            return self._mark(value)
        if isinstance(value, dict):   # keys too: a tool's property may be named like a special token
            return {self._mark_all(k): self._mark_all(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._mark_all(v) for v in value]
        return value

    def _mark(self, content: str) -> str:
        content = content.replace(_MARK_START, "").replace(_MARK_END, "")
        return self._control.sub(lambda m: f"{_MARK_START}{m.group(0)}{_MARK_END}", content)

    def _text_ids(self, text: str) -> list[int]:
        # Stray markers (a template that split a marked token) are dropped, as transformers does.
        text = text.replace(_MARK_START, "").replace(_MARK_END, "")
        return self.tokenizer.encode(text, bos=False) if text else []


def chat_ids(messages: list[dict], tokenizer: Tokenizer, template: ChatTemplate | None,
             tools: list | None = None) -> list[int]:
    """Prompt token ids of [{"role", "content"}, ...]: the template (given `tools` when it reads
    them), or Llama-2's chat format.

    Raises ValueError for a conversation the format refuses (roles out of order, a template's
    raise_exception).
    """
    if template is not None:
        try:
            return template.encode(messages, tools=tools if template.takes_tools else None)
        except jinja2.TemplateError as e:
            raise ValueError(f"the chat template refused the messages: {e}") from None
    msgs = [{**m, "role": "system" if m["role"] == "developer" else m["role"]} for m in messages]
    return format_chat(msgs, tokenizer)
