"""Tools and structured outputs at the API edge: checking a chat request's `tools`, `tool_choice` and
`response_format` (each problem a 400 naming the parameter), turning them into the engine's `Constraint`,
and parsing a finished answer back into OpenAI `tool_calls` in the chat template's own format:

  hermes  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>` blocks, text around them is content
  json    the whole answer is `{"name": ..., "parameters"|"arguments": {...}}` (Llama 3.1+; `;`-separated
          calls and a leading `<|python_tag|>` are accepted)

Pure text and JSON: no torch, no tokenizer.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from tunelab.data.templates import ToolFormat
from tunelab.data.tools import NAME_RE, schema_problem
from tunelab.engine.types import Constraint
from tunelab.server.errors import APIError

_HERMES_RE = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.S)


def _bad(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="invalid_value")


@dataclass(frozen=True)
class ToolPlan:
    """What a chat request asks of tools: the definitions to render, whether to parse calls back, and the
    constraint forcing a call (`tool_choice` required or a named function)."""

    tools: list[dict[str, Any]] | None
    parse: bool
    constraint: Constraint | None


def check_tools(raw: list[dict[str, Any]] | None, functions: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    """Validated tool definitions (legacy `functions` wrapped as tools); 400 naming `tools[i]...`."""
    if raw is not None and functions is not None:
        raise _bad("functions", "give either tools or the legacy functions, not both")
    param = "tools" if functions is None else "functions"
    items = raw if raw is not None else [{"type": "function", "function": f} for f in functions or []]
    out: list[dict[str, Any]] = []
    seen: set[str] = set()
    for i, t in enumerate(items):
        p = f"{param}[{i}]"
        if not isinstance(t, dict) or t.get("type") != "function":
            raise _bad(f"{p}.type", f"{p}.type must be 'function' (the only tool type this server supports)")
        fn = t.get("function")
        if not isinstance(fn, dict):
            raise _bad(f"{p}.function", f"{p}.function must be an object")
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise _bad(f"{p}.function.name", f"{p}.function.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}")
        if name in seen:
            raise _bad(f"{p}.function.name", f"function {name!r} is declared twice")
        seen.add(name)
        params = fn.get("parameters", {"type": "object", "properties": {}})
        if (why := schema_problem(params)) is not None:
            raise _bad(f"{p}.function.parameters", f"{p}.function.parameters {why}")
        if fn.get("strict") and (why := strict_problem(params)) is not None:
            raise _bad(f"{p}.function.parameters", f"strict function {name!r}: {why}")
        out.append({"type": "function", "function": {**fn, "parameters": params}})
    return out


def plan_tools(tools: list[dict[str, Any]], choice: str | dict[str, Any] | None, parallel: bool | None,
               choice_param: str = "tool_choice") -> ToolPlan:
    """Resolve `tool_choice` against the checked tools."""
    if not tools:
        if choice not in (None, "none"):
            raise _bad(choice_param, f"{choice_param} needs tools to choose from")
        return ToolPlan(None, False, None)
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    if choice is None or choice == "auto":
        return ToolPlan(tools, True, None)
    if choice == "none":
        return ToolPlan(tools, False, None)
    if choice == "required":
        fns = tuple((n, json.dumps(f["parameters"])) for n, f in by_name.items())
        return ToolPlan(tools, True, Constraint("tool_call", functions=fns))
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function") if choice_param == "tool_choice" else choice
        if choice_param == "tool_choice" and choice.get("type") != "function":
            raise _bad(f"{choice_param}.type", "tool_choice.type must be 'function'")
        name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _bad(choice_param, f"{choice_param} must be 'auto', 'none', 'required' or "
                   "{'type': 'function', 'function': {'name': ...}}")
    if name not in by_name:
        raise _bad(choice_param, f"{choice_param} names {name!r}, which is not among the tools "
                   f"({', '.join(by_name)})")
    return ToolPlan(tools, True, Constraint("tool_call", functions=((name, json.dumps(by_name[name]["parameters"])),)))


def strict_problem(schema: Any, path: str = "") -> str | None:
    """OpenAI's strict-mode rules: every object lists all its properties as required and sets
    additionalProperties false (checked through nested objects and array items)."""
    if not isinstance(schema, dict):
        return None
    where = path or "the root"
    if schema.get("type") == "object" or "properties" in schema:
        props = schema.get("properties", {})
        if schema.get("additionalProperties", True) is not False:
            return f"{where} must set additionalProperties: false"
        missing = sorted(set(props) - set(schema.get("required", [])))
        if missing:
            return f"{where} must list every property as required (missing: {', '.join(missing)})"
        for k, sub in props.items():
            if (why := strict_problem(sub, f"{path}.{k}" if path else k)) is not None:
                return why
    for key in ("items", "anyOf", "$defs", "definitions"):
        sub = schema.get(key)
        if isinstance(sub, dict) and key in ("$defs", "definitions"):
            subs = list(sub.values())
        else:
            subs = sub if isinstance(sub, list) else [sub]
        for s in subs:
            if (why := strict_problem(s, f"{path}.{key}" if path else key)) is not None:
                return why
    return None


def response_constraint(fmt: dict[str, Any] | None) -> Constraint | None:
    """`response_format` as an engine constraint (None for text); 400 naming the field that is wrong."""
    if fmt is None:
        return None
    kind = fmt.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return Constraint("json")
    if kind != "json_schema":
        raise _bad("response_format.type", f"response_format.type must be text, json_object or json_schema, "
                   f"got {kind!r}")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema", "response_format.json_schema must be an object with a schema")
    name = spec.get("name")
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise _bad("response_format.json_schema.name",
                   f"response_format.json_schema.name must match ^[a-zA-Z0-9_-]{{1,64}}$, got {name!r}")
    schema = spec.get("schema", {"type": "object"})
    if (why := schema_problem(schema)) is not None:
        raise _bad("response_format.json_schema.schema", f"response_format.json_schema.schema {why}")
    strict = spec.get("strict", False)
    if not isinstance(strict, bool):
        raise _bad("response_format.json_schema.strict", "response_format.json_schema.strict must be a boolean")
    if strict and (why := strict_problem(schema)) is not None:
        raise _bad("response_format.json_schema.schema", f"strict schema: {why}")
    return Constraint("json", schema=json.dumps(schema))


# ---------------------------------------------------------------- parsing answers


@dataclass(frozen=True)
class ParsedCall:
    id: str
    name: str
    arguments: str  # JSON text, as OpenAI returns it

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(obj: Any, args_key: str, names: set[str]) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or obj["name"] not in names:
        return None
    args = obj.get(args_key, obj.get("arguments", obj.get("parameters", {})))
    if isinstance(args, str):  # some models write the arguments as JSON text already
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ParsedCall(f"call_{uuid.uuid4().hex[:24]}", obj["name"], json.dumps(args, ensure_ascii=False))


def parse_tool_calls(text: str, fmt: ToolFormat, names: set[str]) -> tuple[str | None, list[ParsedCall]]:
    """(content, calls) from a finished answer; an answer that is not a well-formed call to a declared
    function stays content, as vLLM's parsers do."""
    if fmt.kind == "hermes":
        blocks = _HERMES_RE.findall(text)
        calls: list[ParsedCall] = []
        for b in blocks:
            try:
                c = _call(json.loads(b), fmt.args_key, names)
            except json.JSONDecodeError:
                c = None
            if c is None:
                return text, []
            calls.append(c)
        if not calls:
            return text, []
        rest = _HERMES_RE.sub("", text).strip()
        return rest or None, calls
    body = text.strip().removeprefix("<|python_tag|>").strip()
    if not body.startswith("{"):
        return text, []
    out = []
    for part in body.split(";") if not _loads_object(body) else [body]:
        c = _call(_loads_object(part.strip()), fmt.args_key, names)
        if c is None:
            return text, []
        out.append(c)
    return None, out


def _loads_object(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


def may_be_call(text: str, fmt: ToolFormat) -> bool:
    """Whether a partial answer could still turn out to be a tool call (streaming holds it back till then)."""
    head = text.lstrip()
    if fmt.kind == "hermes":
        return "<tool_call>".startswith(head) or head.startswith("<tool_call>")
    return head.startswith("{") or "<|python_tag|>".startswith(head) or head.startswith("<|python_tag|>")
