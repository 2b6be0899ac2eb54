"""The engine interface the server talks to: plain request/event types, the errors an engine raises, and
the `InferenceEngine` protocol. No torch here, so `tunelab.server` can import it without loading a model.

An engine serves one base model under its own name and any number of adapters under theirs; the `model`
field of a request is one of those names. One request asks for one sequence: the serving layer fans out
`n` choices and multiple prompts into several requests, which the engine batches together anyway.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol, runtime_checkable

from tunelab.data.templates import ToolFormat

FinishReason = Literal["stop", "length"]


class EngineError(Exception):
    """Base of every error an engine reports to the server; `status` is the HTTP status it maps to and
    `code`/`param` fill the OpenAI error body."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code


class ModelNotFoundError(EngineError):
    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class InvalidRequestError(EngineError):
    """The request is well-formed but cannot be served (prompt too long for the context, bad messages)."""

    status = 400
    type = "invalid_request_error"


class AdapterError(EngineError):
    """An adapter folder cannot be served: not a LoRA adapter, unreadable, or built for another base."""

    status = 400
    type = "invalid_request_error"
    code = "adapter_error"


class EngineUnavailableError(EngineError):
    """The engine is shutting down or its worker died; the client may retry elsewhere."""

    status = 503
    type = "server_error"
    code = "engine_unavailable"


@dataclass(frozen=True)
class Constraint:
    """What a request's output must be, enforced token by token (tunelab.engine.constrained): kind "json" is
    one JSON object, valid under `schema` (JSON text) when given; kind "tool_call" is one call, written in the
    chat template's tool format, to one of `functions` ((name, parameters schema JSON text) pairs)."""

    kind: Literal["json", "tool_call"]
    schema: str | None = None
    functions: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens for one sequence. temperature 0 is greedy; `seed` makes sampling repeatable."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # True when the client gave no max_tokens: the engine may lower it to what the context has room for.
    fit_to_context: bool = False
    top_k: int = 0  # 0: off
    repetition_penalty: float = 1.0  # 1.0: off
    logprobs: bool = False  # record each generated token's log-prob (for RL rollouts and reference checks)
    constraint: Constraint | None = None  # structured output: the grammar the tokens must follow


@dataclass(frozen=True)
class GenerationRequest:
    """One sequence to generate. Exactly one of `prompt` (text or token ids) and `messages` (chat turns,
    rendered with the tokenizer's chat template) is set; `tools` (OpenAI function definitions) are rendered
    into a chat prompt by the template, which must support them."""

    model: str
    sampling: SamplingParams
    prompt: str | list[int] | None = None
    messages: list[dict[str, Any]] | None = None
    request_id: str = ""
    tools: list[dict[str, Any]] | None = None


@dataclass(frozen=True)
class GenerationEvent:
    """A piece of output. `text` is new text since the last event (never split inside a stop string or a
    multi-byte character); the last event of a sequence has `finish_reason` set."""

    text: str
    completion_tokens: int
    finish_reason: FinishReason | None = None


@dataclass(frozen=True)
class ModelInfo:
    """One servable model name: the base (parent None) or an adapter on it."""

    id: str
    created: int
    owned_by: str = "tunelab"
    parent: str | None = None
    max_model_len: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class GenerationStream(Protocol):
    """The output of one submitted request. Iterate it for events; `cancel()` stops generation (the server
    calls it when the client disconnects). Errors found after submission (an adapter whose files broke)
    are raised from the iterator as EngineError."""

    request_id: str
    prompt_tokens: int
    tool_format: ToolFormat | None  # how the template writes tool calls, for requests sent with tools

    def __aiter__(self) -> AsyncIterator[GenerationEvent]: ...

    def cancel(self) -> None: ...


@runtime_checkable
class InferenceEngine(Protocol):
    """What the server needs from an engine (the real one in `tunelab.engine.engine`, a fake for tests in
    tests/fake_engine.py). `submit` validates and queues, raising EngineError at once for an unknown model
    or a request that cannot fit; the returned stream yields output as the batching loop produces it."""

    @property
    def base_model_name(self) -> str: ...

    def list_models(self) -> list[ModelInfo]: ...

    def register_adapter(self, name: str, path: str | Path, owned_by: str = "tunelab") -> ModelInfo: ...

    def unregister_adapter(self, name: str) -> None: ...

    async def submit(self, request: GenerationRequest) -> GenerationStream: ...

    def health(self) -> dict[str, Any]: ...

    def close(self) -> None: ...
