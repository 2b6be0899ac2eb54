"""`build_jobs_app(engine, server_settings, jobs_settings)`: the OpenAI-compatible server with the Files and
Fine-tuning Jobs APIs mounted, workers started with the app and stopped with it.

Model isolation: the server's chat/completions/models routes take their serving layer through the
`get_serving` dependency; we override it with a per-request view that hides other owners' `ft:` models from
/v1/models and answers 404 when a key asks for a model another key fine-tuned. No server file is changed.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Any

from fastapi import Depends, FastAPI, Request, Response

from tunelab.engine.types import EngineError, InferenceEngine
from tunelab.jobs import hyper
from tunelab.jobs.routes import router
from tunelab.jobs.service import JobsService, JobsSettings
from tunelab.jobs.store import Store, database_url
from tunelab.jobs.workers import WorkerPool
from tunelab.server import create_app
from tunelab.server.auth import Principal, authenticate
from tunelab.server.errors import APIError
from tunelab.server.protocol import ChatCompletionRequest, CompletionRequest, ModelList
from tunelab.server.routes import get_serving
from tunelab.server.serving import OpenAIServing
from tunelab.server.settings import ServerSettings

if TYPE_CHECKING:
    from tunelab.registry import Registry

log = logging.getLogger(__name__)


class OwnerScopedServing:
    """The serving layer as one owner sees it: other owners' fine-tuned models do not exist."""

    def __init__(self, inner: OpenAIServing, owner: str, service: JobsService) -> None:
        self.inner, self.owner, self.service = inner, owner, service

    def _visible(self, model_id: str, owned_by: str | None = None) -> bool:
        if owned_by == self.owner:
            return True
        return self.service.owns_model(self.owner, model_id) is not False

    def _check(self, model: str) -> None:
        if not self._visible(model):
            raise APIError(404, f"The model {model!r} does not exist", param="model", code="model_not_found")

    def models(self) -> ModelList:
        full = self.inner.models()
        return ModelList(data=[c for c in full.data if self._visible(c.id, c.owned_by)])

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Response:
        self._check(req.model)
        return await self.inner.chat(req, request)

    async def completions(self, req: CompletionRequest, request: Request) -> Response:
        self._check(req.model)
        return await self.inner.completions(req, request)


def _scoped_serving(request: Request, who: Principal = Depends(authenticate)) -> Any:
    return OwnerScopedServing(request.app.state.serving, who.owner, request.app.state.jobs)


def build_jobs_app(
    engine: InferenceEngine, server_settings: ServerSettings, settings: JobsSettings, *, workers: int = 1,
    database: str | None = None, registry: Registry | None = None,
) -> FastAPI:
    settings = _with_model_facts(settings, engine)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    store = Store(database_url(settings.data_dir, database))

    def register(name: str, path: str, owner: str) -> str | None:
        try:
            engine.register_adapter(name, path, owned_by=owner)
        except EngineError as e:
            log.warning("cannot serve %s from %s: %s", name, path, e.message)
            return e.message
        return None

    service = JobsService(store, settings, register=register, registry=registry)
    pool = WorkerPool(service, workers)

    async def shutdown() -> None:
        pool.stop()
        store.close()

    app = create_app(engine, server_settings, extra_routers=[router], on_shutdown=shutdown, registry=registry)
    app.state.jobs = service
    app.state.jobs_pool = pool
    app.dependency_overrides[get_serving] = _scoped_serving
    app.router.on_startup.append(_starter(pool))
    return app


def _with_model_facts(settings: JobsSettings, engine: InferenceEngine) -> JobsSettings:
    """What job options are checked against when a job is created: the base's layer names and context."""
    layers = getattr(engine, "_layer_shapes", None) or {}  # the real Engine's layer table; a fake engine has none
    base = next((m for m in engine.list_models() if m.id == engine.base_model_name), None)
    return dataclasses.replace(
        settings, module_names=settings.module_names or hyper.module_suffixes(list(layers)),
        context_length=settings.context_length or (base.max_model_len if base is not None else None))


def _starter(pool: WorkerPool) -> Any:
    async def start() -> None:
        pool.start()

    return start
