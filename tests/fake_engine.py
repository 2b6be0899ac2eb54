"""A fake engine for route tests: same interface as the real one, no model, no torch.

It "generates" a scripted reply word by word (one word = one token): `echo from MODEL: PROMPT`. It honours
max_tokens, stop strings, cancellation and an optional per-token delay, and records what it was asked,
so tests can assert what the server passed down and that a disconnect cancelled the work.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tunelab.data.templates import ToolFormat
from tunelab.engine.text import StopMatcher
from tunelab.engine.types import (
    AdapterError,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
    ModelNotFoundError,
)


class FakeStream:
    def __init__(self, engine: FakeEngine, request: GenerationRequest, prompt_text: str) -> None:
        self.engine = engine
        self.request = request
        self.request_id = request.request_id or uuid.uuid4().hex
        self.prompt_tokens = len(prompt_text.split())
        self.tool_format: ToolFormat | None = None  # the fake's replies are plain echoes, never tool calls
        self.cancelled = False
        self.finished = False
        self._words = [f" {w}" for w in f"echo from {request.model}: {prompt_text}".split()]

    def cancel(self) -> None:
        if not self.finished and not self.cancelled:
            self.cancelled = True
            self.engine.cancelled.append(self.request_id)

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        sp = self.request.sampling
        matcher = StopMatcher(sp.stop)
        self.engine.active += 1
        try:
            for i, _ in enumerate(self._words[: sp.max_tokens]):
                if self.engine.token_delay:
                    await asyncio.sleep(self.engine.token_delay)
                if self.cancelled:
                    return
                piece, stopped = matcher.update("".join(self._words[: i + 1]))
                if stopped:
                    self.finished = True
                    yield GenerationEvent(piece, i + 1, "stop")
                    return
                if piece:
                    yield GenerationEvent(piece, i + 1)
            done = min(len(self._words), sp.max_tokens)
            self.finished = True
            reason: FinishReason = "length" if len(self._words) > sp.max_tokens else "stop"
            yield GenerationEvent(matcher.flush(), done, reason)
        finally:
            self.engine.active -= 1


class FakeEngine:
    """An InferenceEngine without a model. `adapters` are names served on top of `base`."""

    def __init__(
        self,
        base: str = "fake-base",
        adapters: tuple[str, ...] = ("fake-a", "fake-b"),
        token_delay: float = 0.0,
        max_model_len: int = 1024,
    ) -> None:
        self._base = base
        self._created = int(time.time())
        self._adapters: dict[str, ModelInfo] = {}
        self.token_delay = token_delay
        self.max_model_len = max_model_len
        self.requests: list[GenerationRequest] = []
        self.cancelled: list[str] = []
        self.active = 0
        self.closed = False
        for name in adapters:
            self._adapters[name] = ModelInfo(name, self._created, parent=base, max_model_len=max_model_len)

    @property
    def base_model_name(self) -> str:
        return self._base

    def list_models(self) -> list[ModelInfo]:
        base = ModelInfo(self._base, self._created, max_model_len=self.max_model_len)
        return [base, *self._adapters.values()]

    def register_adapter(self, name: str, path: str | Path, owned_by: str = "tunelab") -> ModelInfo:
        if name == self._base or name in self._adapters:
            raise AdapterError(f"a model named {name!r} is already served", param="name")
        if not (Path(path) / "adapter_config.json").exists():
            raise AdapterError(f"{path}: no adapter_config.json (not a PEFT adapter folder)")
        info = ModelInfo(name, int(time.time()), owned_by, self._base, self.max_model_len)
        self._adapters[name] = info
        return info

    def unregister_adapter(self, name: str) -> None:
        if self._adapters.pop(name, None) is None:
            raise ModelNotFoundError(f"no adapter named {name!r}", param="model")

    async def submit(self, request: GenerationRequest) -> FakeStream:
        if self.closed:
            raise InvalidRequestError("engine is closed")
        if request.model != self._base and request.model not in self._adapters:
            raise ModelNotFoundError(f"The model {request.model!r} does not exist", param="model")
        if request.messages is not None:
            prompt_text = " ".join(str(m.get("content", "")) for m in request.messages)
        elif isinstance(request.prompt, list):
            prompt_text = " ".join(f"t{t}" for t in request.prompt)
        else:
            prompt_text = request.prompt or ""
        stream = FakeStream(self, request, prompt_text)
        budget = self.max_model_len - stream.prompt_tokens
        if request.sampling.fit_to_context and request.sampling.max_tokens > budget >= 1:
            request = dataclasses.replace(request, sampling=dataclasses.replace(request.sampling, max_tokens=budget))
            stream = FakeStream(self, request, prompt_text)
        if stream.prompt_tokens + request.sampling.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({stream.prompt_tokens} tokens) plus max_tokens exceeds the context of {self.max_model_len}",
                param="max_tokens",
            )
        self.requests.append(request)
        return stream

    def health(self) -> dict[str, Any]:
        return {"active": self.active, "loaded_adapters": sorted(self._adapters)}

    def close(self) -> None:
        self.closed = True
