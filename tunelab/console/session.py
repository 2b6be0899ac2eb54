"""Console sign-in: cookie sessions with a CSRF token each, kept in the server's memory.

With API keys configured, a visitor signs in with a key (checked by `tunelab.server.auth.principal_for_key`, the
API's own rule) and the session then acts as that key's `Principal`: every page calls the same service functions
with the same owner as the API would. Without keys the session is the API's anonymous principal at once.

The cookie is HttpOnly and SameSite=Strict (Secure over https) and holds only a random session id; the key itself
never leaves the sign-in request. Every state-changing request must echo the session's CSRF token in the
`X-CSRF-Token` header (or a `csrf` form field); sign-in rotates the session id. Sessions end on sign-out, after
`SESSION_SECONDS` or when the server restarts (they live in memory, on purpose: nothing to leak on disk).
"""

from __future__ import annotations

import hmac
import secrets
import threading
import time
from dataclasses import dataclass

from fastapi import Request
from starlette.responses import Response

from tunelab.server.auth import ANONYMOUS, Principal
from tunelab.server.errors import APIError
from tunelab.server.settings import ServerSettings

COOKIE = "tunelab_console"
SESSION_SECONDS = 12 * 3600
MAX_SESSIONS = 10_000  # unauthenticated visitors each get one (for the sign-in form's CSRF token): bound them


@dataclass
class Session:
    id: str
    csrf: str
    principal: Principal | None  # None: not signed in yet (the sign-in form)
    expires: float


class Sessions:
    def __init__(self) -> None:
        self._by_id: dict[str, Session] = {}
        self._lock = threading.Lock()

    def new(self, principal: Principal | None) -> Session:
        s = Session(secrets.token_urlsafe(32), secrets.token_urlsafe(32), principal, time.time() + SESSION_SECONDS)
        with self._lock:
            now = time.time()
            if len(self._by_id) >= MAX_SESSIONS:  # drop expired ones, then the oldest anonymous ones
                self._by_id = {k: v for k, v in self._by_id.items() if v.expires > now}
                if len(self._by_id) >= MAX_SESSIONS:
                    for k in [k for k, v in self._by_id.items() if v.principal is None][: MAX_SESSIONS // 10]:
                        del self._by_id[k]
            self._by_id[s.id] = s
        return s

    def get(self, sid: str | None) -> Session | None:
        if not sid:
            return None
        with self._lock:
            s = self._by_id.get(sid)
            if s is not None and s.expires < time.time():
                del self._by_id[sid]
                return None
            return s

    def drop(self, sid: str | None) -> None:
        with self._lock:
            self._by_id.pop(sid or "", None)


def sessions(request: Request) -> Sessions:
    store: Sessions = request.app.state.console_sessions  # made by build_console
    return store


def needs_keys(request: Request) -> bool:
    settings: ServerSettings = request.app.state.settings
    return bool(settings.api_keys)


def current(request: Request) -> Session:
    """The visitor's session, made on first sight (anonymous and signed in when the server has no keys)."""
    found = sessions(request).get(request.cookies.get(COOKIE))
    if found is None:
        found = sessions(request).new(None if needs_keys(request) else ANONYMOUS)
        request.state.new_session = found
    return found


def set_cookie(request: Request, response: Response, session: Session) -> None:
    response.set_cookie(COOKIE, session.id, max_age=SESSION_SECONDS, path="/console", httponly=True,
                        samesite="strict", secure=request.url.scheme == "https")


def check_csrf(request: Request, session: Session, form_value: str | None = None) -> None:
    sent = request.headers.get("x-csrf-token") or form_value or ""
    if not hmac.compare_digest(sent.encode(), session.csrf.encode()):
        raise APIError(403, "missing or wrong CSRF token: reload the page and try again", code="csrf_failed")


def signed_in(request: Request) -> Principal:
    """The principal of a signed-in session, else 401 (API routes); pages redirect to the sign-in form instead."""
    s = current(request)
    if s.principal is None:
        raise APIError(401, "sign in first", code="not_signed_in")
    if request.method not in ("GET", "HEAD"):
        check_csrf(request, s)
    return s.principal
