"""The internal record types every reader produces and every trainer consumes.

Two families exist: a `Conversation` (SFT, and KTO when `label` is set) and a `Preference` pair (DPO, ORPO,
SimPO, reward models). Records are immutable and remember where they came from (file and 1-based line), so
any later stage can point the user at the exact line.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "developer", "user", "assistant", "tool")


@dataclass(frozen=True, slots=True)
class Source:
    file: str
    line: int


@dataclass(frozen=True, slots=True)
class Message:
    role: str
    content: str
    # OpenAI allows weight 0/1 on assistant messages: 0 means "show to the model, do not train on it".
    weight: float | None = None
    name: str | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        if self.weight is not None:
            out["weight"] = int(self.weight) if float(self.weight).is_integer() else self.weight
        return out

    def template_dict(self) -> dict[str, Any]:
        """What a chat template sees: no training-only keys."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        if self.name is not None:
            out["name"] = self.name
        return out


@dataclass(frozen=True, slots=True)
class Conversation:
    messages: tuple[Message, ...]
    # KTO's unpaired feedback: True = desirable completion, False = undesirable, None = plain SFT example.
    label: bool | None = None
    source: Source | None = field(default=None, compare=False)

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
        if self.label is not None:
            out["label"] = self.label
        return out

    def key(self) -> str:
        """A canonical text used for exact-duplicate detection and split assignment."""
        return "\x1e".join(f"{m.role}\x1f{m.content.strip()}" for m in self.messages)


@dataclass(frozen=True, slots=True)
class Preference:
    prompt: tuple[Message, ...]
    chosen: tuple[Message, ...]
    rejected: tuple[Message, ...]
    source: Source | None = field(default=None, compare=False)

    def to_json(self) -> dict[str, Any]:
        return {
            "prompt": [m.to_json() for m in self.prompt],
            "chosen": [m.to_json() for m in self.chosen],
            "rejected": [m.to_json() for m in self.rejected],
        }

    def key(self) -> str:
        parts = [f"{m.role}\x1f{m.content.strip()}" for m in (*self.prompt, *self.chosen, *self.rejected)]
        return "\x1e".join(parts)

    def as_conversations(self) -> tuple[Conversation, Conversation]:
        return (
            Conversation(self.prompt + self.chosen, source=self.source),
            Conversation(self.prompt + self.rejected, source=self.source),
        )


Record = Conversation | Preference
