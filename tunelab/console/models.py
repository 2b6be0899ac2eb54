"""Models page: the registry (`tunelab.registry.Registry`, the same database as `tunelab registry --data-dir`)
with each name's versions, lineage and metrics, aliases and their history; promote, set an alias, roll back,
split traffic A/B; and the base model(s) the server serves.

Registry owners: with API keys, the key's owner (as the jobs API); without keys the CLI's own owner, "local",
so the console and `tunelab registry` on the same data dir show the same models.
"""

from __future__ import annotations

import threading
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field

from tunelab.console.app import page
from tunelab.console.session import current, signed_in
from tunelab.registry import Registry
from tunelab.registry.types import DEFAULT_ALIAS, RegistryError, parse_split
from tunelab.server.auth import ANONYMOUS, Principal
from tunelab.server.errors import APIError

router = APIRouter()
Who = Depends(signed_in)
_open_lock = threading.Lock()


def registry_owner(who: Principal) -> str:
    return "local" if who == ANONYMOUS else who.owner


def registry(request: Request) -> Registry:
    state = request.app.state
    found: Registry | None = getattr(state, "console_registry", None)
    if found is not None:
        return found
    jobs = getattr(state, "jobs", None)
    if jobs is None:
        raise APIError(404, "the registry lives in the jobs API's data dir; this server runs with --no-jobs",
                       code="registry_off")
    with _open_lock:
        if getattr(state, "console_registry", None) is None:
            state.console_registry = Registry.open(jobs.settings.data_dir)
    reg: Registry = state.console_registry
    return reg


def call_registry(fn: Any, *args: Any, **kw: Any) -> Any:
    try:
        return fn(*args, **kw)
    except RegistryError as e:  # the registry's own 4xx, with its message, as the API would answer
        raise APIError(getattr(e, "status", 400), e.message, code=getattr(e, "code", "invalid_request")) from None


@router.get("/models", response_class=HTMLResponse)
def models_page(request: Request, name: str | None = None) -> Response:
    who = current(request).principal
    engine = request.app.state.engine
    base = [m for m in engine.list_models() if m.id == engine.base_model_name]
    if who is None:
        return page(request, "models.html", "Models", names=[], base=base)
    try:
        reg = registry(request)
    except APIError as e:
        return page(request, "models.html", "Models", names=[], base=base, off=e.message)
    owner = registry_owner(who)
    names = reg.names(owner)
    chosen = name if name in names else (names[0] if names else None)
    versions = reg.versions(chosen, owner) if chosen else []
    aliases = reg.aliases(chosen, owner) if chosen else []
    history = {a.alias: reg.history(chosen, a.alias, owner) for a in aliases} if chosen else {}
    by_version: dict[int, list[str]] = {}
    for a in aliases:
        for v, w in a.split.items():
            by_version.setdefault(v, []).append(a.alias if len(a.split) == 1 else f"{a.alias} ({w:.0%})")
    return page(request, "models.html", "Models", names=names, chosen=chosen, versions=versions[::-1],
                aliases=aliases, history=history, by_version=by_version, base=base, default_alias=DEFAULT_ALIAS)


class AliasMove(BaseModel):
    name: str = Field(min_length=1, max_length=100)
    alias: str = Field(DEFAULT_ALIAS, min_length=1, max_length=100)
    version: int | None = Field(None, ge=1)
    split: str | None = Field(None, max_length=1000, description="VERSION=WEIGHT pairs, e.g. 1=90,2=10")


@router.post("/api/models/{action}")
def move_alias(action: str, body: AliasMove, request: Request, who: Principal = Who) -> dict[str, Any]:
    """promote | alias (any alias to one version) | rollback | split (weighted A/B)."""
    reg, owner = registry(request), registry_owner(who)
    if action in ("promote", "alias"):
        if body.version is None:
            raise APIError(400, "give the version to point the alias at", param="version")
        fn = reg.promote if action == "promote" else reg.alias
        return call_registry(fn, body.name, alias=body.alias, version=body.version, owner=owner, by=who.owner).to_dict()
    if action == "rollback":
        return call_registry(reg.rollback, body.name, body.alias, owner=owner, by=who.owner).to_dict()
    if action == "split":
        if not body.split:
            raise APIError(400, "give the split as VERSION=WEIGHT pairs, e.g. 1=90,2=10", param="split")
        split = call_registry(parse_split, body.split)
        for v in split:
            call_registry(reg.get, body.name, v, owner)  # every version must exist
        return call_registry(reg.route, body.name, body.alias, split, owner=owner, by=who.owner).to_dict()
    raise APIError(404, f"no registry action {action!r} (promote, alias, rollback or split)", code="not_found")
