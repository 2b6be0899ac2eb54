"""The OpenAI routes and /health. Thin: parse (FastAPI + protocol.py), call the serving layer, return.

Authentication is applied to the whole app in `create_app`, so every route here (and every router mounted
through `extra_routers`) is guarded; a route that needs to know who called takes `Depends(authenticate)`.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from tunelab.server.auth import Principal, authenticate
from tunelab.server.errors import APIError
from tunelab.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList
from tunelab.server.routing import RoutedServing, Routing, Serving
from tunelab.server.serving import OpenAIServing

router = APIRouter()


def get_serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


def get_routed(request: Request, serving: Serving = Depends(get_serving),
               who: Principal = Depends(authenticate)) -> RoutedServing:
    """The caller's view of the serving layer (`get_serving`, which the jobs API overrides with its owner-scoped
    one): registry names resolved, the version header and metrics (tunelab.server.routing)."""
    routing: Routing = request.app.state.routing
    return routing.view(serving, who)


@router.get("/v1/models", response_model=ModelList)
async def list_models(serving: RoutedServing = Depends(get_routed)) -> ModelList:
    return serving.models()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, serving: RoutedServing = Depends(get_routed)) -> ModelCard:
    for card in serving.models().data:
        if card.id == model_id:
            return card
    raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: RoutedServing = Depends(get_routed)
) -> Response:
    return await serving.chat(body, request)


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, request: Request, serving: RoutedServing = Depends(get_routed)
) -> Response:
    return await serving.completions(body, request)


@router.get("/health")
async def health(
    request: Request, principal: Principal = Depends(authenticate), serving: RoutedServing = Depends(get_routed)
) -> Response:
    """`{"status": "ok"}` for everyone; an admin key also gets the engine's details, limited to the models
    that key may see (other owners' model names, and how many there are, stay hidden)."""
    state = request.app.state
    draining = bool(getattr(state, "draining", False))
    body: dict[str, Any] = {"status": "draining" if draining else "ok"}
    if principal.admin:
        visible = {card.id for card in serving.models().data}
        body["model"] = state.engine.base_model_name
        body["engine"] = _visible_health(state.engine.health(), visible, state.engine.base_model_name)
    return JSONResponse(body, status_code=503 if draining else 200)


def _visible_health(details: dict[str, Any], visible: set[str], base: str) -> dict[str, Any]:
    """An allow-list: plain numbers and flags pass; names pass only when the caller may see them. A new
    field that carries names stays out until it is added here."""
    out: dict[str, Any] = {k: v for k, v in details.items() if v is None or isinstance(v, bool | int | float)}
    out["loaded_adapters"] = [n for n in details.get("loaded_adapters", []) if n in visible]
    out["adapters"] = len(visible - {base})
    merged = details.get("merged")
    out["merged"] = merged if merged in visible else None
    # Folders of --adapters-dir the operator pointed the server at (never an owner's upload or job).
    rejected = details.get("rejected_adapters")
    if isinstance(rejected, dict):
        out["rejected_adapters"] = {str(k): str(v) for k, v in rejected.items()}
    return out
