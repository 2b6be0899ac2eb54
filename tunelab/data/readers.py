"""Readers: JSONL files in any supported format in, `Conversation`/`Preference` records out, plus every
problem found with its file, 1-based line and field.

Formats (detected per line from its keys; one file holds one format):
  messages           {"messages": [{"role", "content", "weight"?, "name"?}, ...]}   (OpenAI chat)
                     + "tools"/"functions", assistant "tool_calls", "tool" messages (see tunelab.data.tools)
  prompt_completion  {"prompt": str, "completion": str}                            (OpenAI legacy)
  alpaca             {"instruction": str, "input"?: str, "output": str, "system"?: str}
  sharegpt           {"conversations": [{"from": "human"|"gpt"|"system"|..., "value": str}, ...]}
  preference         {"prompt": str|messages, "chosen": str|messages, "rejected": str|messages, "tools"?}
  unpaired           {"prompt": str|messages, "completion": str|messages, "label": bool}   (KTO)
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.records import ROLES, Conversation, Message, Preference, Record, Source
from tunelab.data.tools import CallState, answered_call, parse_tool_calls, parse_tools, tool_names
from tunelab.errors import DataError, Issue, TunelabError

FORMATS = ("messages", "prompt_completion", "alpaca", "sharegpt", "preference", "unpaired")
MESSAGE_KEYS = {"role", "content", "weight", "name", "tool_calls", "tool_call_id", "function_call"}
TOOL_KEYS = {"tools", "functions", "parallel_tool_calls"}
TOP_KEYS = {
    "messages": {"messages", "tools", "functions", "parallel_tool_calls", "id", "metadata"},
    "prompt_completion": {"prompt", "completion", "id", "metadata"},
    "alpaca": {"instruction", "input", "output", "system", "id", "metadata"},
    "sharegpt": {"conversations", "system", "id", "metadata"},
    "preference": {"prompt", "chosen", "rejected", "id", "metadata", *TOOL_KEYS},
    "unpaired": {"prompt", "completion", "label", "id", "metadata"},
}
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bing": "assistant",
    "bard": "assistant",
    "system": "system",
    "tool": "tool",
    "function_response": "tool",
}


@dataclass
class ParseResult:
    path: str
    format: str | None
    records: list[Record] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)
    lines: int = 0

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]


def detect_format(obj: dict[str, Any]) -> str | None:
    keys = obj.keys()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if "chosen" in keys or "rejected" in keys:
        return "preference"
    if "instruction" in keys or "output" in keys:
        return "alpaca"
    if "label" in keys and ("completion" in keys or "prompt" in keys):
        return "unpaired"
    if "prompt" in keys or "completion" in keys:
        return "prompt_completion"
    return None


class _LineParser:
    """Parses one JSON object into a record, collecting issues instead of raising."""

    def __init__(self, path: str, line: int) -> None:
        self.path = path
        self.line = line
        self.issues: list[Issue] = []

    def err(self, fld: str | None, msg: str) -> None:
        self.issues.append(Issue(self.path, self.line, fld, msg, "error"))

    def warn(self, fld: str | None, msg: str) -> None:
        self.issues.append(Issue(self.path, self.line, fld, msg, "warning"))

    def unknown_keys(self, obj: dict[str, Any], allowed: set[str], prefix: str = "") -> None:
        for k in obj:
            if k not in allowed:
                self.err(f"{prefix}{k}", f"unknown key {k!r} (allowed: {', '.join(sorted(allowed))})")

    def text(self, obj: dict[str, Any], key: str, *, required: bool = True, fld: str | None = None) -> str | None:
        fld = fld or key
        if key not in obj or obj[key] is None:
            if required:
                self.err(fld, f"missing required field {key!r}")
            return None
        val = obj[key]
        if not isinstance(val, str):
            self.err(fld, f"{key!r} must be a string, got {type(val).__name__}")
            return None
        return val

    def call_state(self, obj: dict[str, Any]) -> tuple[tuple[dict[str, Any], ...], CallState] | None:
        """The line's tools and the call-tracking state its messages share; None after an error."""
        tools = parse_tools(obj, self.err)
        parallel = obj.get("parallel_tool_calls", True)
        if not isinstance(parallel, bool):
            self.err("parallel_tool_calls", f"parallel_tool_calls must be true or false, got {parallel!r}")
            return None
        if tools is None:
            return None
        return tools, CallState(tool_names(tools), parallel)

    def messages(self, raw: Any, fld: str, *, require_assistant: bool = True,
                 state: CallState | None = None) -> tuple[Message, ...] | None:
        state = state if state is not None else CallState(set())
        if not isinstance(raw, list):
            self.err(fld, f"{fld!r} must be a list of messages, got {type(raw).__name__}")
            return None
        if not raw:
            self.err(fld, f"{fld!r} is empty")
            return None
        out: list[Message] = []
        ok = True
        for i, m in enumerate(raw):
            mf = f"{fld}[{i}]"
            if not isinstance(m, dict):
                self.err(mf, f"message must be an object, got {type(m).__name__}")
                ok = False
                continue
            self.unknown_keys(m, MESSAGE_KEYS, prefix=f"{mf}.")
            role = m.get("role")
            if role is None:
                self.err(f"{mf}.role", "missing 'role'")
                ok = False
            elif not isinstance(role, str) or (role not in ROLES and role != "function"):
                self.err(f"{mf}.role", f"unknown role {role!r} (expected one of: {', '.join(ROLES)})")
                ok = False
            calls = parse_tool_calls(m, mf, state, self.err)
            if calls is None:
                ok = False
                continue
            call_id: str | None = None
            if role in ("tool", "function"):
                answered = answered_call(m, mf, state, self.err)
                if answered is False:
                    ok = False
                    continue
                call_id = answered if isinstance(answered, str) else None
            elif "tool_call_id" in m:
                self.err(f"{mf}.tool_call_id", "only tool messages answer a call")
                ok = False
            if calls and m.get("content") is None:
                m = {**m, "content": ""}  # OpenAI: an assistant turn that only calls tools has null content
            if "content" not in m:
                self.err(f"{mf}.content", "missing 'content'")
                ok = False
                continue
            content = m["content"]
            if not isinstance(content, str):
                self.err(f"{mf}.content", f"content must be a string, got {type(content).__name__}")
                ok = False
                continue
            weight = m.get("weight")
            if weight is not None:
                if isinstance(weight, bool) or weight not in (0, 1):
                    self.err(f"{mf}.weight", f"weight must be 0 or 1, got {weight!r}")
                    ok = False
                elif role != "assistant":
                    self.err(f"{mf}.weight", "weight is only allowed on assistant messages")
                    ok = False
            name = m.get("name")
            if name is not None and not isinstance(name, str):
                self.err(f"{mf}.name", f"name must be a string, got {type(name).__name__}")
                ok = False
            if isinstance(role, str):
                out.append(Message("tool" if role == "function" else role, content,
                                   None if weight is None else float(weight), name, calls, call_id))
        if not ok:
            return None
        if require_assistant:
            if not any(m.role == "assistant" for m in out):
                self.err(fld, "no assistant message: there is nothing to train on")
                return None
            if out[-1].role == "user":
                self.warn(f"{fld}[{len(out) - 1}]", "conversation ends on a user turn; it is not trained on")
        return tuple(out)

    def text_or_messages(self, obj: dict[str, Any], key: str, role: str,
                         state: CallState | None = None) -> tuple[Message, ...] | None:
        if key not in obj or obj[key] is None:
            self.err(key, f"missing required field {key!r}")
            return None
        val = obj[key]
        if isinstance(val, str):
            return (Message(role, val),)
        if isinstance(val, list):
            return self.messages(val, key, require_assistant=False, state=state)
        self.err(key, f"{key!r} must be a string or a list of messages, got {type(val).__name__}")
        return None

    def parse(self, obj: dict[str, Any], fmt: str) -> Record | None:
        src = Source(self.path, self.line)
        if fmt != "messages" and fmt != "preference" and (tk := sorted(TOOL_KEYS & obj.keys())):
            self.err(tk[0], f"{tk[0]!r} is not part of the {fmt} format: tools go with the chat (messages) or "
                     "preference format, as in OpenAI's fine-tuning files")
            return None
        self.unknown_keys(obj, TOP_KEYS[fmt])
        if fmt == "messages":
            if "messages" not in obj or obj["messages"] is None:
                self.err("messages", "missing 'messages'")
                return None
            ts = self.call_state(obj)
            if ts is None:
                return None
            msgs = self.messages(obj["messages"], "messages", state=ts[1])
            return Conversation(msgs, source=src, tools=ts[0]) if msgs else None
        if fmt == "prompt_completion":
            p, c = self.text(obj, "prompt"), self.text(obj, "completion")
            if p is None or c is None:
                return None
            if not c.strip():
                self.err("completion", "completion is empty")
                return None
            return Conversation((Message("user", p), Message("assistant", c)), source=src)
        if fmt == "alpaca":
            ins, out = self.text(obj, "instruction"), self.text(obj, "output")
            inp = self.text(obj, "input", required=False)
            system = self.text(obj, "system", required=False)
            if ins is None or out is None:
                return None
            user = ins if not inp else f"{ins}\n\n{inp}"
            turns = ([Message("system", system)] if system else []) + [
                Message("user", user),
                Message("assistant", out),
            ]
            return Conversation(tuple(turns), source=src)
        if fmt == "sharegpt":
            conv = obj.get("conversations")
            if not isinstance(conv, list) or not conv:
                self.err("conversations", "'conversations' must be a non-empty list")
                return None
            converted: list[dict[str, Any]] = []
            system = self.text(obj, "system", required=False)
            if system:
                converted.append({"role": "system", "content": system})
            for i, turn in enumerate(conv):
                if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
                    self.err(f"conversations[{i}]", "each turn needs 'from' and 'value'")
                    return None
                role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
                if role is None:
                    self.err(f"conversations[{i}].from", f"unknown speaker {turn['from']!r}")
                    return None
                converted.append({"role": role, "content": turn["value"]})
            msgs = self.messages(converted, "conversations")
            return Conversation(msgs, source=src) if msgs else None
        if fmt == "preference":
            ts = self.call_state(obj)
            if ts is None:
                return None
            prompt = self.text_or_messages(obj, "prompt", "user", ts[1])
            # Both answers continue the same prompt: each gets its own copy of the calls made so far.
            chosen = self.text_or_messages(obj, "chosen", "assistant", ts[1].copy())
            rejected = self.text_or_messages(obj, "rejected", "assistant", ts[1].copy())
            if prompt is None or chosen is None or rejected is None:
                return None
            if [m.key() for m in chosen] == [m.key() for m in rejected]:
                self.err("rejected", "chosen and rejected are identical: the pair teaches nothing")
                return None
            return Preference(prompt, chosen, rejected, source=src, tools=ts[0])
        if fmt == "unpaired":
            prompt = self.text_or_messages(obj, "prompt", "user")
            completion = self.text_or_messages(obj, "completion", "assistant")
            label = obj.get("label")
            if not isinstance(label, bool):
                self.err("label", f"label must be true or false, got {label!r}")
                return None
            if prompt is None or completion is None:
                return None
            return Conversation(prompt + completion, label=label, source=src)
        raise AssertionError(fmt)


def iter_lines(path: Path) -> Iterator[tuple[int, str | None, bytes]]:
    """Yields (1-based line number, decoded text or None if not UTF-8, raw bytes). Accepts a UTF-8 BOM and CRLF."""
    with path.open("rb") as f:
        for i, raw in enumerate(f, start=1):
            if i == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield i, None, raw
                continue
            yield i, text.rstrip("\r\n"), raw


def parse_file(path: str | Path, expect: str | None = None) -> ParseResult:
    """Parse a JSONL file, collecting every problem. `expect` restricts the allowed format family:
    "conversation" (SFT/KTO formats) or "preference"."""
    p = Path(path)
    name = str(path)
    if not p.exists():
        raise TunelabError(f"{name}: file not found")
    if p.is_dir():
        raise TunelabError(f"{name}: is a directory, expected a JSONL file")
    res = ParseResult(name, None)
    fmt_line = 0
    blank_lines: list[int] = []
    for lineno, text, _raw in iter_lines(p):
        res.lines = lineno
        if text is None:
            res.issues.append(Issue(name, lineno, None, "line is not valid UTF-8"))
            continue
        if not text.strip():
            blank_lines.append(lineno)
            continue
        if blank_lines:  # a blank line followed by more data is suspicious but harmless
            for b in blank_lines:
                res.issues.append(Issue(name, b, None, "blank line skipped", "warning"))
            blank_lines = []
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            res.issues.append(Issue(name, lineno, None, f"not valid JSON: {e.msg} at column {e.colno}"))
            continue
        if not isinstance(obj, dict):
            res.issues.append(Issue(name, lineno, None, f"expected a JSON object, got {type(obj).__name__}"))
            continue
        fmt = detect_format(obj)
        if fmt is None:
            keys = ", ".join(sorted(obj)) or "none"
            res.issues.append(
                Issue(name, lineno, None, f"unrecognised example (keys: {keys}); expected 'messages', "
                      "'prompt'/'completion', 'instruction'/'output', 'conversations' or 'prompt'/'chosen'/'rejected'")
            )
            continue
        if res.format is None:
            res.format, fmt_line = fmt, lineno
        elif fmt != res.format:
            res.issues.append(
                Issue(name, lineno, None, f"mixed formats: this line is {fmt!r} but the file is {res.format!r} "
                      f"(from line {fmt_line}); one file must hold one format")
            )
            continue
        lp = _LineParser(name, lineno)
        rec = lp.parse(obj, fmt)
        res.issues.extend(lp.issues)
        if rec is not None:
            res.records.append(rec)
    if res.format is None and not res.errors:
        res.issues.append(Issue(name, None, None, "file is empty: no examples found"))
    if expect is not None and res.format is not None:
        family = "preference" if res.format == "preference" else "conversation"
        if family != expect:
            res.issues.append(
                Issue(name, None, None, f"this training method needs {expect} data, but the file is {res.format!r}")
            )
    return res


def read_records(path: str | Path, expect: str | None = None) -> list[Record]:
    """Parse a file and raise DataError (listing every error) if anything is wrong."""
    res = parse_file(path, expect)
    if res.errors:
        raise DataError(res.issues, header=f"{path}: invalid data")
    return res.records


def read_conversations(path: str | Path) -> list[Conversation]:
    recs = read_records(path, expect="conversation")
    return [r for r in recs if isinstance(r, Conversation)]


def read_preferences(path: str | Path) -> list[Preference]:
    recs = read_records(path, expect="preference")
    return [r for r in recs if isinstance(r, Preference)]


def write_jsonl(path: str | Path, rows: list[dict[str, Any]]) -> None:
    """Write atomically: a crash mid-write never leaves a half file under the final name."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(p)
