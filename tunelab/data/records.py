"""The internal record types every reader produces and every trainer consumes.

Two families exist: a `Conversation` (SFT, and KTO when `label` is set) and a `Preference` pair (DPO, ORPO,
SimPO, reward models). Records are immutable and remember where they came from (file and 1-based line), so
any later stage can point the user at the exact line.

Tool calling follows OpenAI's chat format: a record may declare `tools` (function definitions, kept as the
JSON objects OpenAI sends), an assistant message may carry `tool_calls` (its `content` then may be empty) and a
`tool` message answers one call through `tool_call_id`. `template_dict` hands these to a chat template the
way Hugging Face templates expect them (arguments as a parsed object, not a JSON string).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Source:
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class ToolCall:
    """One function call made by an assistant turn; `arguments` is the JSON object text, as OpenAI sends it."""

    id: str
    name: str
    arguments: str

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}

    def template_dict(self) -> dict[str, Any]:
        # HF chat templates render `arguments | tojson`: they expect the object, not its JSON text.
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": json.loads(self.arguments)}}


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str  # "" for an assistant turn that only calls tools (OpenAI's null content)
    # OpenAI allows weight 0/1 on assistant messages: 0 means "show to the model, do not train on it".
    weight: float | None = None
    name: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": None if self.tool_calls and not self.content
                               else self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.to_json() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        if self.weight is not None:
            out["weight"] = int(self.weight) if float(self.weight).is_integer() else self.weight
        return out

    def template_dict(self) -> dict[str, Any]:
        """What a chat template sees: no training-only keys."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.tool_calls:
            out["tool_calls"] = [c.template_dict() for c in self.tool_calls]
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def key(self) -> str:
        calls = "".join(f"\x1d{c.name}{c.arguments}" for c in self.tool_calls)
        return f"{self.role}\x1f{self.content.strip()}{calls}"


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    # KTO's unpaired feedback: True = desirable completion, False = undesirable, None = plain SFT example.
    label: bool | None = None
    source: Source | None = field(default=None, compare=False)
    # OpenAI's `tools` (function definitions) the conversation may call; () when it declares none.
    tools: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    @property
    def prompt(self) -> tuple[Message, ...]:
        """Everything before the last assistant message."""
        last = max((i for i, m in enumerate(self.messages) if m.role == "assistant"), default=len(self.messages))
        return self.messages[:last]

    @property
    def completion(self) -> str:
        for m in reversed(self.messages):
            if m.role == "assistant":
                return m.content
        return ""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"messages": [m.to_json() for m in self.messages]}
        if self.tools:
            out["tools"] = list(self.tools)
        if self.label is not None:
            out["label"] = self.label
        return out

    def key(self) -> str:
        """A canonical text used for exact-duplicate detection and split assignment."""
        return _tools_key(self.tools) + "\x1e".join(m.key() for m in self.messages)


@dataclass(frozen=True, slots=True)
class Preference:
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    source: Source | None = field(default=None, compare=False)
    tools: tuple[dict[str, Any], ...] = field(default=(), compare=False)

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt": [m.to_json() for m in self.prompt],
            "chosen": [m.to_json() for m in self.chosen],
            "rejected": [m.to_json() for m in self.rejected],
        }
        if self.tools:
            out["tools"] = list(self.tools)
        return out

    def key(self) -> str:
        return _tools_key(self.tools) + "\x1e".join(m.key() for m in (*self.prompt, *self.chosen, *self.rejected))

    def as_conversations(self) -> tuple[Conversation, Conversation]:
        return (
            Conversation(self.prompt + self.chosen, source=self.source, tools=self.tools),
            Conversation(self.prompt + self.rejected, source=self.source, tools=self.tools),
        )


def _tools_key(tools: tuple[dict[str, Any], ...]) -> str:
    return json.dumps(list(tools), sort_keys=True) + "\x1c" if tools else ""


Record = Conversation | Preference
