"""Tool-calling fields of OpenAI's chat format, checked line by line: the `tools` (or legacy `functions`) a
record declares, the `tool_calls` of assistant turns and the `tool` messages answering them.

A line is refused (with its field) when a tool definition is malformed, a call's `arguments` are not the text
of a JSON object, a call names a function the line does not declare, two calls share an id, a `tool` message
comes before any call or answers an id no earlier call used, or `parallel_tool_calls: false` is broken by a
turn with several calls. Legacy function calling (`functions`, an assistant `function_call`, `function`
messages) is read as the equivalent tools, tool call and tool message.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunelab.data.records import ToolCall

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
Err = Callable[[str | None, str], None]


def schema_problem(schema: Any) -> str | None:
    """Why `schema` is not a usable JSON Schema object (None when it is)."""
    if not isinstance(schema, dict):
        return f"must be a JSON Schema object, got {type(schema).__name__}"
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError

    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"is not a valid JSON Schema{f' (at {where})' if where else ''}: {e.message}"
    return None


def parse_tools(obj: dict[str, Any], err: Err) -> tuple[dict[str, Any], ...] | None:
    """The line's tool definitions as OpenAI `tools` entries; None after reporting an error."""
    raw, fld, legacy = obj.get("tools"), "tools", False
    if obj.get("functions") is not None:
        if raw is not None:
            err("functions", "give either 'tools' or the legacy 'functions', not both")
            return None
        raw, fld, legacy = obj["functions"], "functions", True
    if raw is None:
        return ()
    if not isinstance(raw, list):
        err(fld, f"{fld!r} must be a list, got {type(raw).__name__}")
        return None
    out: list[dict[str, Any]] = []
    names: set[str] = set()
    ok = True
    for i, t in enumerate(raw):
        tf = f"{fld}[{i}]"
        if legacy:
            t = {"type": "function", "function": t}
        elif not isinstance(t, dict) or t.get("type") != "function":
            err(f"{tf}.type", "each tool must be {'type': 'function', 'function': {...}}")
            ok = False
            continue
        fn = t.get("function")
        ff = tf if legacy else f"{tf}.function"
        if not isinstance(fn, dict):
            err(ff, f"a function definition must be an object, got {type(fn).__name__}")
            ok = False
            continue
        name = fn.get("name")
        if not isinstance(name, str) or not NAME_RE.match(name):
            err(f"{ff}.name", f"function name must match [A-Za-z0-9_-]{{1,64}}, got {name!r}")
            ok = False
            continue
        if name in names:
            err(f"{ff}.name", f"function {name!r} is declared twice")
            ok = False
        names.add(name)
        if "parameters" in fn and (why := schema_problem(fn["parameters"])) is not None:
            err(f"{ff}.parameters", f"parameters {why}")
            ok = False
        if "description" in fn and not isinstance(fn["description"], str):
            err(f"{ff}.description", "description must be a string")
            ok = False
        out.append({"type": "function", "function": fn})
    return tuple(out) if ok else None


def tool_names(tools: tuple[dict[str, Any], ...]) -> set[str]:
    return {t["function"]["name"] for t in tools}


@dataclass
class CallState:
    """What the messages so far have called: ids issued, in order (a tool message must answer one of them)."""

    declared: set[str]
    parallel: bool = True
    issued: dict[str, str] = field(default_factory=dict)  # call id -> function name
    answered: set[str] = field(default_factory=set)
    legacy_count: int = 0

    def copy(self) -> CallState:
        return CallState(set(self.declared), self.parallel, dict(self.issued), set(self.answered), self.legacy_count)


def parse_tool_calls(m: dict[str, Any], mf: str, state: CallState, err: Err) -> tuple[ToolCall, ...] | None:
    """An assistant message's `tool_calls` (or legacy `function_call`); None after reporting an error."""
    raw = m.get("tool_calls")
    legacy = m.get("function_call")
    if raw is None and legacy is None:
        return ()
    if m.get("role") != "assistant":
        err(f"{mf}.tool_calls", "only assistant messages may call tools")
        return None
    if legacy is not None:
        if raw is not None:
            err(f"{mf}.function_call", "give either 'tool_calls' or the legacy 'function_call', not both")
            return None
        state.legacy_count += 1
        raw = [{"id": f"call_legacy_{state.legacy_count}", "type": "function", "function": legacy}]
        prefix = f"{mf}.function_call"
    else:
        prefix = f"{mf}.tool_calls"
    if not isinstance(raw, list) or not raw:
        err(prefix, "tool_calls must be a non-empty list")
        return None
    calls: tuple[ToolCall, ...] | None = None
    if len(raw) > 1 and not state.parallel:
        err(prefix, f"{len(raw)} calls in one turn but the line sets parallel_tool_calls: false")
    else:
        calls = _read_calls(raw, prefix, legacy is not None, state, err)
    if calls is None:  # the ids still count as issued, so the tool messages answering them raise no more errors
        for c in raw:
            if isinstance(c, dict) and isinstance(c.get("id"), str):
                state.issued.setdefault(c["id"], "")
    return calls


def _read_calls(raw: list[Any], prefix: str, legacy: bool, state: CallState, err: Err) -> tuple[ToolCall, ...] | None:
    out: list[ToolCall] = []
    for j, c in enumerate(raw):
        cf = prefix if legacy else f"{prefix}[{j}]"
        if not isinstance(c, dict) or not isinstance(c.get("function"), dict):
            err(cf, "a tool call must be {'id', 'type': 'function', 'function': {'name', 'arguments'}}")
            return None
        cid, fn = c.get("id"), c["function"]
        if not isinstance(cid, str) or not cid:
            err(f"{cf}.id", "a tool call needs a non-empty string 'id'")
            return None
        if c.get("type", "function") != "function":
            err(f"{cf}.type", f"tool call type must be 'function', got {c.get('type')!r}")
            return None
        if cid in state.issued or any(tc.id == cid for tc in out):
            err(f"{cf}.id", f"tool call id {cid!r} is used twice")
            return None
        fpath = cf if legacy else f"{cf}.function"
        name, args = fn.get("name"), fn.get("arguments")
        if not isinstance(name, str) or not name:
            err(f"{fpath}.name", "a tool call needs the function's 'name'")
            return None
        if name not in state.declared:
            known = ", ".join(sorted(state.declared)) or "none: the line has no 'tools'"
            err(f"{fpath}.name", f"calls {name!r}, which is not declared in tools (declared: {known})")
            return None
        if not isinstance(args, str):
            err(f"{fpath}.arguments", f"arguments must be a string holding a JSON object, got {type(args).__name__}")
            return None
        try:
            parsed = json.loads(args)
        except json.JSONDecodeError as e:
            err(f"{fpath}.arguments", f"arguments are not valid JSON: {e.msg} at character {e.pos}")
            return None
        if not isinstance(parsed, dict):
            err(f"{fpath}.arguments", f"arguments must be a JSON object, got {type(parsed).__name__}")
            return None
        out.append(ToolCall(cid, name, args))
    for tc in out:
        state.issued[tc.id] = tc.name
    return tuple(out)


def answered_call(m: dict[str, Any], mf: str, state: CallState, err: Err) -> str | None | bool:
    """A `tool` (or legacy `function`) message's call id; False after reporting an error."""
    if not state.issued:
        err(f"{mf}.role", "a tool message before any assistant tool call: it answers nothing")
        return False
    if m.get("role") == "function":  # legacy: answers the latest unanswered call of that name
        name = m.get("name")
        for cid in reversed(state.issued):
            if state.issued[cid] == name and cid not in state.answered:
                state.answered.add(cid)
                return cid
        err(f"{mf}.name", f"a function message for {name!r} answers no earlier function_call")
        return False
    answer = m.get("tool_call_id")
    if not isinstance(answer, str) or not answer:
        err(f"{mf}.tool_call_id", "a tool message needs the 'tool_call_id' of the call it answers")
        return False
    cid = answer
    if cid not in state.issued:
        err(f"{mf}.tool_call_id", f"tool_call_id {cid!r} answers no earlier call (calls so far: "
            f"{', '.join(state.issued)})")
        return False
    state.answered.add(cid)
    return cid
