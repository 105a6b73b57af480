"""Tool calls on /v1/chat/completions: OpenAI's `tools` and a forced `tool_choice` through guided
decoding, and the tool turns of a conversation rendered for the model.

`tool_choice="required"` constrains the reply to a JSON array of calls, each
`{"name": <one of the tools>, "arguments": <that tool's parameters schema>}` (one call unless
`parallel_tool_calls`); a named function constrains it to that function's arguments. The reply
then comes back as `message.tool_calls`. With `"auto"` (the default with tools) the reply is
free: a reply that is, whole, a JSON call or list of calls of known tools (`{"name": ...,
"arguments" or "parameters": {...}}`, the JSON form Llama models are taught) becomes tool calls,
anything else is text.
"""
import json
import re
import uuid

from jllm.guided import Guided

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_tools(tools) -> list[dict]:
    """OpenAI's tools -> [{"type": "function", "function": {"name", "description", "parameters"}}]
    (ValueError naming the entry)."""
    if not isinstance(tools, list) or not tools:
        raise ValueError(f"expected a non-empty list of tools, got {str(tools)[:80]}")
    out, names = [], set()
    for i, t in enumerate(tools):
        fn = t.get("function") if isinstance(t, dict) and t.get("type") == "function" else None
        if not isinstance(fn, dict):
            raise ValueError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}")
        name = fn.get("name")
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise ValueError(f"tools[{i}].function.name must be 1-64 letters, digits, '_' or '-', got {name!r}")
        if name in names:
            raise ValueError(f"tools[{i}]: two tools are named {name!r}")
        names.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        desc = fn.get("description")
        if desc is not None and not isinstance(desc, str):
            raise ValueError(f"tools[{i}].function.description must be a string")
        out.append({"type": "function", "function": {"name": name, "description": desc or "", "parameters": params}})
    return out


def forced_name(tool_choice) -> str | None:
    """The function a tool_choice names ({"type": "function", "function": {"name": ...}}), else None."""
    if isinstance(tool_choice, dict):
        fn = tool_choice.get("function")
        if tool_choice.get("type") == "function" and isinstance(fn, dict) and isinstance(fn.get("name"), str):
            return fn["name"]
        raise ValueError("expected 'none', 'auto', 'required' or {'type': 'function', 'function': {'name': ...}}, "
                         f"got {str(tool_choice)[:80]}")
    if tool_choice not in ("none", "auto", "required"):
        raise ValueError(f"expected 'none', 'auto', 'required' or a named function, got {str(tool_choice)[:80]}")
    return None


_VALUES = ("const", "enum", "default", "examples")   # keywords whose values are data, not schemas


def _rooted(schema: dict, tool: str, defs: dict) -> dict:
    """A tool's parameters schema placed whole at the combined schema's $defs/tool.NAME, its
    local $refs ("#", "#/...") prefixed to point inside it there (its $id and $schema dropped,
    which would make "#" mean itself) -> the $ref to use in its place."""
    base = f"#/$defs/tool.{tool}"

    def rewrite(x):
        if isinstance(x, dict):
            out = {k: v if k in _VALUES else rewrite(v) for k, v in x.items()}
            ref = x.get("$ref")
            if isinstance(ref, str) and (ref == "#" or ref.startswith("#/")):
                out["$ref"] = base + ref[1:]
            return out
        if isinstance(x, list):
            return [rewrite(v) for v in x]
        return x

    defs[f"tool.{tool}"] = rewrite({k: v for k, v in schema.items() if k not in ("$id", "$schema")})
    return {"$ref": base}


def tool_guide(tools: list[dict], tool_choice, parallel: bool) -> Guided:
    """The grammar of a forced tool choice ("required" or a named function)."""
    name = forced_name(tool_choice)
    params = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    if name is not None:
        return Guided.json_schema(params[name])
    defs: dict = {}
    calls = [{"type": "object", "properties": {"name": {"const": n}, "arguments": _rooted(p, n, defs)},
              "required": ["name", "arguments"], "additionalProperties": False} for n, p in params.items()]
    schema = {"type": "array", "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1,
              "$defs": defs}
    if not parallel:
        schema["maxItems"] = 1
    return Guided.json_schema(schema)


def tool_calls(text: str, tool_choice) -> list[dict] | None:
    """A guided reply -> OpenAI's message.tool_calls, or None if it is not complete JSON (a reply
    cut by max_tokens)."""
    try:
        value = json.loads(text)
    except (ValueError, RecursionError):
        return None
    name = forced_name(tool_choice)
    calls = [{"name": name, "arguments": value}] if name is not None else value
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in calls]


def auto_tool_calls(text: str, tools: list[dict]) -> list[dict] | None:
    """A free reply -> tool calls if it is, whole, a JSON call or list of calls of these tools
    (with "arguments" or "parameters" an object, or JSON text of one), else None."""
    try:
        value = json.loads(text.strip())
    except (ValueError, RecursionError):   # not JSON, or past the parser's limits
        return None
    names = {t["function"]["name"] for t in tools}
    calls = value if isinstance(value, list) else [value]
    out = []
    for c in calls:
        if not isinstance(c, dict) or not isinstance(c.get("name"), str) or c["name"] not in names:
            return None
        args = c.get("arguments", c.get("parameters", {}))
        args = _arguments(args)
        if not isinstance(args, dict):
            return None
        out.append({"name": c["name"], "arguments": args})
    if not out:
        return None
    return [{"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
             "function": {"name": c["name"], "arguments": json.dumps(c["arguments"], ensure_ascii=False)}}
            for c in out]


def _arguments(text):
    try:
        return json.loads(text) if isinstance(text, str) else text
    except (ValueError, RecursionError):
        return text


def render_messages(messages: list[dict], tools: list[dict] | None, template_takes_tools: bool) -> list[dict]:
    """Messages (with assistant tool_calls and tool results) for the chat template: as transformers'
    templates take them (arguments as objects) when the template reads `tools`; otherwise plain
    turns: the tools described in the system message, calls as their JSON, results as user turns."""
    if template_takes_tools:
        out = []
        for m in messages:
            m = dict(m)
            if m.get("tool_calls"):
                m["tool_calls"] = [{**c, "function": {**c["function"], "arguments": _arguments(c["function"]["arguments"])}}
                                   for c in m["tool_calls"]]
            out.append(m)
        return out
    out = []
    for m in messages:
        role, content = m["role"], m["content"]
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": _arguments(c["function"]["arguments"])}
                     for c in m["tool_calls"]]
            content = (content + "\n" if content else "") + json.dumps(calls, ensure_ascii=False)
        if role == "tool":
            role, content = "user", f"Result of tool call {m.get('tool_call_id') or ''}: {content}".replace("  ", " ")
        if out and out[-1]["role"] == role and role != "system":
            out[-1] = {"role": role, "content": out[-1]["content"] + "\n" + content}
        else:
            out.append({"role": role, "content": content})
    if tools:
        note = ('To call a function, answer with only {"name": ..., "arguments": {...}}. Functions:\n'
                + json.dumps([t["function"] for t in tools], ensure_ascii=False))
        if out and out[0]["role"] in ("system", "developer"):
            out[0] = {**out[0], "content": note + "\n\n" + out[0]["content"]}
        else:
            out.insert(0, {"role": "system", "content": note})
    return out
