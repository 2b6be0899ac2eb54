"""Playground: one prompt to two models side by side, streamed through the server's own chat serving layer (as
the owner sees it: other owners' fine-tuned models do not exist, the same `OwnerScopedServing` the API uses),
with the decoding settings shown; and blind pairwise rating: the server keeps which model is A and which is B
(the page never learns the names until it has voted), and the vote goes to the same JSONL store and summary as
`tunelab judge --human` (`tunelab.eval.judge.record_human_verdict` / `summarize_human`), one file per owner and
pair of models under `DATA_DIR/judge/`.
"""

from __future__ import annotations

import hashlib
import json
import random
import secrets
import threading
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from tunelab.console.app import page
from tunelab.console.session import current, signed_in
from tunelab.server.auth import Principal
from tunelab.server.errors import APIError
from tunelab.server.protocol import ChatCompletionRequest

router = APIRouter()
Who = Depends(signed_in)
MAX_PAIRS = 1000  # open blind pairs kept per server (the oldest are forgotten first)
_pairs_lock = threading.Lock()


def _pairs(request: Request) -> dict[str, dict[str, Any]]:
    """Open blind pairs (token -> who may rate it, X, Y and their order), made by build_console."""
    found: dict[str, dict[str, Any]] = request.app.state.console_pairs
    return found


def serving_for(request: Request, who: Principal) -> Any:
    state = request.app.state
    if getattr(state, "jobs", None) is None:
        return state.serving
    from tunelab.jobs.app import OwnerScopedServing

    return OwnerScopedServing(state.serving, who.owner, state.jobs)


def store_path(request: Request, who: Principal, x: str, y: str) -> Path | None:
    jobs = getattr(request.app.state, "jobs", None)
    if jobs is None:
        return None
    # A readable folder per owner, with a hash so that owners "a b" and "a-b" never share one.
    safe = "".join(c if c.isalnum() or c in "-_." else "-" for c in who.owner)[:80]
    safe += "-" + hashlib.sha256(who.owner.encode()).hexdigest()[:8]
    pair = hashlib.sha256(f"{x}\n{y}".encode()).hexdigest()[:16]
    return Path(jobs.settings.data_dir) / "judge" / safe / f"human-{pair}.jsonl"


@router.get("/playground", response_class=HTMLResponse)
def playground_page(request: Request) -> Response:
    who = current(request).principal
    models = [] if who is None else [m.id for m in serving_for(request, who).models().data]
    settings = request.app.state.settings
    return page(request, "playground.html", "Playground", models=models, max_tokens_limit=settings.max_tokens_limit,
                blind_ok=getattr(request.app.state, "jobs", None) is not None)


class Play(BaseModel):
    prompt: str = Field(min_length=1, max_length=100_000)
    system: str | None = Field(None, max_length=100_000)
    model: str | None = None
    pair: str | None = None
    side: Literal["A", "B"] | None = None
    temperature: float = 0.7
    top_p: float = 1.0
    max_tokens: int = 128
    seed: int | None = None


@router.post("/api/chat")
async def chat(body: Play, request: Request, who: Principal = Who) -> Response:
    """A streamed chat completion (OpenAI's SSE chunks) from one side of the playground."""
    model = body.model
    if body.pair is not None:
        with _pairs_lock:
            pair = _pairs(request).get(body.pair)
        if pair is None or pair["owner"] != who.owner:
            raise APIError(404, "no such blind pair (it may have expired): start a new one", param="pair")
        if body.side is None:
            raise APIError(400, "give side A or B", param="side")
        model = pair["a"] if body.side == "A" else pair["b"]
    if not model:
        raise APIError(400, "choose a model", param="model")
    messages = ([{"role": "system", "content": body.system}] if body.system else []) + [
        {"role": "user", "content": body.prompt}]
    payload = {"model": model, "messages": messages, "stream": True, "temperature": body.temperature,
               "top_p": body.top_p, "max_tokens": body.max_tokens, "seed": body.seed}
    try:
        req = ChatCompletionRequest.model_validate_json(json.dumps(payload))
    except ValueError as e:
        raise APIError(400, f"invalid decoding settings: {e}", code="invalid_value") from None
    response: Response = await serving_for(request, who).chat(req, request)
    return response


class PairStart(BaseModel):
    x: str = Field(min_length=1)
    y: str = Field(min_length=1)
    prompt: str = Field(min_length=1, max_length=100_000)


@router.post("/api/pairs")
def start_pair(body: PairStart, request: Request, who: Principal = Who) -> dict[str, Any]:
    """A blind pair: X and Y shown as A and B in a random order the server alone keeps."""
    if store_path(request, who, body.x, body.y) is None:
        raise APIError(404, "blind rating stores its votes in the jobs data dir; this server runs with --no-jobs")
    visible = {m.id for m in serving_for(request, who).models().data}
    for param, name in (("x", body.x), ("y", body.y)):
        if name not in visible:
            raise APIError(404, f"The model {name!r} does not exist", param=param, code="model_not_found")
    x_is_a = random.random() < 0.5
    token = secrets.token_urlsafe(16)
    with _pairs_lock:
        pairs = _pairs(request)
        while len(pairs) >= MAX_PAIRS:
            del pairs[next(iter(pairs))]
        pairs[token] = {"owner": who.owner, "x": body.x, "y": body.y, "x_is_a": x_is_a, "prompt": body.prompt,
                         "a": body.x if x_is_a else body.y, "b": body.y if x_is_a else body.x}
    return {"pair": token}


class Vote(BaseModel):
    pair: str
    verdict: Literal["A", "B", "tie"]


@router.post("/api/votes")
def vote(body: Vote, request: Request, who: Principal = Who) -> dict[str, Any]:
    from tunelab.eval.judge import record_human_verdict, summarize_human

    with _pairs_lock:
        pair = _pairs(request).get(body.pair)
        if pair is None or pair["owner"] != who.owner:
            raise APIError(404, "no such blind pair (already rated, or expired)", param="pair")
        del _pairs(request)[body.pair]
    path = store_path(request, who, pair["x"], pair["y"])
    assert path is not None
    rec = record_human_verdict(path, body.pair, x_name=pair["x"], y_name=pair["y"], x_is_a=pair["x_is_a"],
                               verdict=body.verdict, prompt=pair["prompt"])
    return {"recorded": rec, "a": pair["a"], "b": pair["b"], "summary": summarize_human(path)}
