"""Which model a request is served by: registry names (`NAME`, `NAME@3`, `NAME@staging`) resolved per request,
the `x-tunelab-model-version` header on every chat/completions response, and per-version Prometheus metrics.

`Routing` (one per app, `app.state.routing`) owns the registry view of the engine. A request's `model` that names a
registry model of the caller's owner is resolved through `Registry.resolve` on every request (aliases are read
fresh, so `tunelab registry promote` from another process applies to the next request); the resolved version's
adapter is registered with the engine once, under an internal name, through the `InferenceEngine` seam, and kept
(the base is never reloaded). Any other `model` (the base, a served adapter, an `ft:` name) goes to the engine as
is and is labelled with its own name.

The serving layer never learns about the registry: it is handed the request with `model` set to the version's
label (`NAME@V`, which its response bodies echo, as OpenAI echoes the dated model behind an alias), and its engine
is `RoutedEngine`, which turns that label into the engine's internal name for the request being handled (a
context variable, set for the duration of the call) and counts tokens per label.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import logging
import threading
import time
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest

from tunelab.engine.types import (
    EngineError,
    GenerationEvent,
    GenerationRequest,
    GenerationStream,
    InferenceEngine,
    ModelInfo,
)
from tunelab.server.auth import Principal, authenticate
from tunelab.server.errors import APIError
from tunelab.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

if TYPE_CHECKING:
    from tunelab.registry import Registry, Version

log = logging.getLogger(__name__)

HEADER = "x-tunelab-model-version"
# Engine names of registry versions. Never a valid client `model`: requests naming one directly get 404, and
# /v1/models hides them (the owner and weights hash inside are the server's business).
INTERNAL_PREFIX = "registry:"
UNKNOWN = "unknown"  # the metrics label of requests for a model that does not exist (bounded label values)


@dataclass(frozen=True)
class _Route:
    label: str  # NAME@V for a registry version, else the model's own name
    engine_model: str  # the engine's name for it


_CURRENT: contextvars.ContextVar[_Route | None] = contextvars.ContextVar("tunelab_route", default=None)


class Metrics:
    """Prometheus metrics of one app (its own CollectorRegistry: several apps in one process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tunelab_requests", "Chat and completion requests by model version and status",
                                ["model_version", "endpoint", "status"], registry=self.registry)
        self.prompt_tokens = Counter("tunelab_prompt_tokens", "Prompt tokens processed (each of n choices counts)",
                                     ["model_version"], registry=self.registry)
        self.completion_tokens = Counter("tunelab_completion_tokens", "Tokens generated",
                                         ["model_version"], registry=self.registry)
        self.latency = Histogram("tunelab_request_duration_seconds",
                                 "Request time until the last byte (streams: until the stream ends)",
                                 ["model_version", "endpoint"], registry=self.registry,
                                 buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, float("inf")))

    def observe(self, label: str, endpoint: str, status: int, started: float) -> None:
        self.requests.labels(label, endpoint, str(status)).inc()
        self.latency.labels(label, endpoint).observe(time.perf_counter() - started)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _CountedStream:
    """An engine stream whose generated tokens are added to the label's counter when it ends (or is cancelled)."""

    def __init__(self, inner: GenerationStream, counter: Any) -> None:
        self._inner, self._counter = inner, counter
        self.request_id = inner.request_id
        self.prompt_tokens = inner.prompt_tokens
        self.tool_format = inner.tool_format

    def cancel(self) -> None:
        self._inner.cancel()

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        done = 0
        try:
            async for ev in self._inner:
                done = ev.completion_tokens
                yield ev
        finally:
            self._counter.inc(done)


class RoutedEngine:
    """The engine as the serving layer sees it: the current request's label maps to the engine's name."""

    def __init__(self, inner: InferenceEngine, metrics: Metrics) -> None:
        self.inner, self.metrics = inner, metrics

    @property
    def base_model_name(self) -> str:
        return self.inner.base_model_name

    def list_models(self) -> list[ModelInfo]:
        return self.inner.list_models()

    def register_adapter(self, name: str, path: str | Path, owned_by: str = "tunelab") -> ModelInfo:
        return self.inner.register_adapter(name, path, owned_by=owned_by)

    def unregister_adapter(self, name: str) -> None:
        self.inner.unregister_adapter(name)

    async def submit(self, request: GenerationRequest) -> GenerationStream:
        route = _CURRENT.get()
        label = request.model
        if route is not None and request.model == route.label:
            request = dataclasses.replace(request, model=route.engine_model)
        stream = await self.inner.submit(request)
        self.metrics.prompt_tokens.labels(label).inc(stream.prompt_tokens)
        return _CountedStream(stream, self.metrics.completion_tokens.labels(label))

    def health(self) -> dict[str, Any]:
        return self.inner.health()

    def close(self) -> None:
        self.inner.close()


class Serving(Protocol):
    """What the routes need of a serving layer (OpenAIServing, or the jobs API's owner-scoped view of it)."""

    def models(self) -> ModelList: ...

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response: ...

    async def completions(self, req: CompletionRequest, request: Request) -> Response: ...


def _not_found(message: str) -> APIError:
    return APIError(404, message, param="model", code="model_not_found")


class Routing:
    """Registry routing and metrics of one app. `registry` may be attached later (`tunelab serve` does)."""

    def __init__(self, engine: InferenceEngine, registry: Registry | None = None) -> None:
        self.engine = engine
        self.registry = registry
        self.metrics = Metrics()
        self.engine_view = RoutedEngine(engine, self.metrics)
        # (owner, name, version) -> (weights hash, engine name). Versions are immutable, so this never goes
        # stale; the hash catches a removed version whose number was reused by a later registration.
        self._versions: dict[tuple[str, str, int], tuple[str, str]] = {}
        self._lock = threading.Lock()

    def view(self, inner: Serving, who: Principal) -> RoutedServing:
        from tunelab.registry.types import registry_owner

        return RoutedServing(inner, self, registry_owner(who.owner, keyed=who.api_key is not None))

    # ------------------------------------------------------------------ resolution
    async def route(self, model: str, owner: str, user: str | None) -> _Route:
        if model.startswith(INTERNAL_PREFIX):
            raise _not_found(f"The model {model!r} does not exist")
        if self.registry is None or model == self.engine.base_model_name:
            return _Route(model, model)
        from tunelab.registry import RegistryError, parse_ref

        try:
            ref = parse_ref(model)
        except RegistryError:
            return _Route(model, model)  # not registry syntax: an ft: name, an adapter with other characters
        # The registry is a database (and adapter registration reads a file header): off the event loop.
        return await asyncio.to_thread(self._resolve, model, ref, owner, user)

    def _resolve(self, model: str, ref: Any, owner: str, user: str | None) -> _Route:
        from tunelab.registry import RegistryError

        assert self.registry is not None
        if not self.registry.exists(ref.name, owner=owner):
            return _Route(model, model)  # a served adapter's name, or unknown: the engine answers
        try:
            v = self.registry.resolve(ref, owner=owner, user=user)
        except RegistryError as e:
            raise APIError(e.status, f"model {model!r}: {e.message}", param="model", code=e.code) from e
        if v.kind != "adapter":
            raise APIError(400, f"model {model!r} is {v.ref}, a full fine-tuned model: this server holds one base "
                           f"model and serves adapters on it; serve it with `tunelab serve --model "
                           f"{v.weights_dir}`", param="model", code="model_not_servable")
        return _Route(v.ref, self._engine_name(owner, v))

    def _engine_name(self, owner: str, v: Version) -> str:
        key = (owner, v.name, v.version)
        digest = str(v.lineage.get("weights_sha256") or v.created_at)
        with self._lock:
            have = self._versions.get(key)
            if have is not None and have[0] == digest:
                return have[1]
            name = f"{INTERNAL_PREFIX}{owner}/{v.ref}#{digest[:12]}"
            try:
                self.engine.register_adapter(name, v.weights_dir, owned_by=owner)
            except EngineError as e:
                raise APIError.from_engine(e) if e.status >= 500 else APIError(
                    e.status, f"model {v.ref!r}: {e.message}", param="model", code=e.code) from e
            if have is not None:  # the number was reused after a removal: the old weights go
                try:
                    self.engine.unregister_adapter(have[1])
                except EngineError:
                    pass
            self._versions[key] = (digest, name)
            log.info("serving %s (owner %s) from %s", v.ref, owner, v.weights_dir)
            return name

    def cards(self, owner: str) -> list[ModelCard]:
        """The registry names an owner may use: NAME (when it has a production alias), NAME@ALIAS, NAME@V."""
        if self.registry is None:
            return []
        from tunelab.registry import DEFAULT_ALIAS

        base = self.engine.base_model_name
        out: list[ModelCard] = []
        for name in self.registry.names(owner=owner):
            versions = {v.version: v for v in self.registry.versions(name, owner=owner) if v.kind == "adapter"}
            for a in self.registry.aliases(name, owner=owner):
                if not set(a.split) <= set(versions):
                    continue
                ids = [name, f"{name}@{a.alias}"] if a.alias == DEFAULT_ALIAS else [f"{name}@{a.alias}"]
                out += [ModelCard(id=i, created=a.updated_at, owned_by=owner, parent=base) for i in ids]
            out += [ModelCard(id=v.ref, created=v.created_at, owned_by=owner, parent=base) for v in versions.values()]
        return out


class RoutedServing:
    """One caller's view: registry names resolve, every response carries the version header and is counted."""

    def __init__(self, inner: Serving, routing: Routing, owner: str) -> None:
        self.inner, self.routing, self.owner = inner, routing, owner

    def models(self) -> ModelList:
        plain = [c for c in self.inner.models().data if not c.id.startswith(INTERNAL_PREFIX)]
        seen = {c.id for c in plain}
        return ModelList(data=[*plain, *(c for c in self.routing.cards(self.owner) if c.id not in seen)])

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        return await self._handle("chat", req, request, self.inner.chat)

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        return await self._handle("completions", req, request, self.inner.completions)

    async def _handle(self, endpoint: str, req: Any, request: Request,
                      call: Callable[[Any, Request], Awaitable[Response]]) -> Response:
        metrics = self.routing.metrics
        started = time.perf_counter()
        label = UNKNOWN
        try:
            route = await self.routing.route(req.model, self.owner, req.user)
            label = route.label
            token = _CURRENT.set(route)
            try:
                response = await call(req.model_copy(update={"model": route.label}), request)
            finally:
                _CURRENT.reset(token)
        except APIError as e:
            if e.code == "model_not_found" and e.param == "model":
                label = UNKNOWN  # a client's made-up name is not a metrics label
            elif label != UNKNOWN:  # resolved, then refused (max_tokens, ...): say which version refused
                e.headers = {**(e.headers or {}), HEADER: label}
            metrics.observe(label, endpoint, e.status, started)
            raise
        except BaseException:
            metrics.observe(label, endpoint, 500, started)
            raise
        response.headers[HEADER] = label
        if isinstance(response, StreamingResponse):
            response.body_iterator = _observed(response.body_iterator, metrics, label, endpoint, started)
        else:
            metrics.observe(label, endpoint, response.status_code, started)
        return response


async def _observed(body: AsyncIterable[Any], metrics: Metrics, label: str, endpoint: str,
                    started: float) -> AsyncIterator[Any]:
    try:
        async for piece in body:
            yield piece
    finally:
        metrics.observe(label, endpoint, 200, started)


metrics_router = APIRouter()


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, who: Principal = Depends(authenticate)) -> Response:
    """Prometheus text format. With API keys configured only admin keys may read it (names of models in use)."""
    if request.app.state.settings.api_keys and not who.admin:
        raise APIError(403, "/metrics is readable with an admin key only", code="permission_denied")
    routing: Routing = request.app.state.routing
    return Response(routing.metrics.render(), media_type=CONTENT_TYPE_LATEST)
