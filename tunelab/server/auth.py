"""Bearer API keys. `authenticate` is a FastAPI dependency guarding every route; routes (and routers
mounted later, like a fine-tuning jobs API) take `principal: Principal = Depends(authenticate)` to learn
which key and owner made the request. FastAPI caches it per request, so it runs once.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from fastapi import Request

from tunelab.server.errors import APIError
from tunelab.server.settings import ServerSettings


@dataclass(frozen=True)
class Principal:
    """Who made a request. `api_key` is None when the server runs without keys (owner "anonymous").
    `admin`: the key may read server details (/health); it sees no other owner's data for that."""

    owner: str
    api_key: str | None = None
    admin: bool = False


ANONYMOUS = Principal(owner="anonymous")


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    # Some clients (Azure-style) send the key in its own header.
    return request.headers.get("api-key") or None


async def authenticate(request: Request) -> Principal:
    settings: ServerSettings = request.app.state.settings
    if not settings.api_keys:
        return ANONYMOUS
    token = _bearer(request)
    if token is None:
        raise APIError(401, "missing API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    principal = principal_for_key(settings, token)
    if principal is None:
        raise APIError(401, "incorrect API key provided", code="invalid_api_key",
                       headers={"WWW-Authenticate": "Bearer"})
    return principal


def principal_for_key(settings: ServerSettings, token: str) -> Principal | None:
    """Who `token` is, or None for an unknown key (the web console's sign-in asks the same question)."""
    for key, owner in settings.api_keys.items():
        # Constant-time comparison: response timing must not reveal how much of a key matched.
        if hmac.compare_digest(key.encode(), token.encode()):
            return Principal(owner=owner, api_key=key, admin=key in settings.admin_keys)
    return None
