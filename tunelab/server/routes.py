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
from tunelab.server.serving import OpenAIServing

router = APIRouter()


def get_serving(request: Request) -> OpenAIServing:
    serving: OpenAIServing = request.app.state.serving
    return serving


@router.get("/v1/models", response_model=ModelList)
async def list_models(serving: OpenAIServing = Depends(get_serving)) -> ModelList:
    return serving.models()


@router.get("/v1/models/{model_id:path}", response_model=ModelCard)
async def get_model(model_id: str, serving: OpenAIServing = Depends(get_serving)) -> ModelCard:
    for card in serving.models().data:
        if card.id == model_id:
            return card
    raise APIError(404, f"The model {model_id!r} does not exist", param="model", code="model_not_found")


@router.post("/v1/chat/completions")
async def chat_completions(
    body: ChatCompletionRequest, request: Request, serving: OpenAIServing = Depends(get_serving)
) -> Response:
    return await serving.chat(body, request)


@router.post("/v1/completions")
async def completions(
    body: CompletionRequest, request: Request, serving: OpenAIServing = Depends(get_serving)
) -> Response:
    return await serving.completions(body, request)


@router.get("/health")
async def health(request: Request, principal: Principal = Depends(authenticate)) -> Response:
    state = request.app.state
    draining = bool(getattr(state, "draining", False))
    body: dict[str, Any] = {
        "status": "draining" if draining else "ok",
        "model": state.engine.base_model_name,
        "engine": state.engine.health(),
    }
    return JSONResponse(body, status_code=503 if draining else 200)
