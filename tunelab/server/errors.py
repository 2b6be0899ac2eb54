"""OpenAI-style errors: `{"error": {"message", "type", "param", "code"}}` with the matching HTTP status.

Every failure the server returns goes through here: our own `APIError`, an engine's `EngineError`, FastAPI's
validation errors (400, not FastAPI's 422, as OpenAI clients expect) and plain HTTP errors (404 route, 405).
Every error carries a `code`. No 5xx ever carries exception text: the exception is logged with a request id,
and the client gets that id (in the message and the `X-Request-Id` header) to quote.
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tunelab.engine.types import EngineError, EngineUnavailableError

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 403: "permission_error",
          404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
          429: "requests", 503: "server_error"}
# The code an error gets when its raiser gave none.
_CODES = {400: "invalid_request", 401: "invalid_api_key", 403: "permission_denied", 404: "not_found",
          405: "method_not_allowed", 413: "request_too_large", 429: "rate_limit_exceeded", 503: "server_unavailable"}


class APIError(Exception):
    """An error the server answers with; raise it from routes and dependencies."""

    def __init__(
        self, status: int, message: str, *, param: str | None = None, code: str | None = None,
        type: str | None = None, headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code or _CODES.get(status, "internal_error" if status >= 500 else "invalid_request")
        self.type = type or _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
        self.headers = headers

    @classmethod
    def from_engine(cls, e: EngineError) -> APIError:
        if e.status >= 500 and not isinstance(e, EngineUnavailableError):
            # An engine failure's message may hold exception text or server paths: log it, send an id.
            return internal_error(e.message, code=e.code or "generation_failed")
        return cls(e.status, e.message, param=e.param, code=e.code, type=e.type)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def new_request_id() -> str:
    return "req_" + uuid.uuid4().hex[:24]


def internal_error(detail: str, *, code: str = "internal_error", exc: BaseException | None = None) -> APIError:
    """A 500 that tells the client only a request id; `detail` (and the traceback) go to the log."""
    rid = new_request_id()
    log.error("request %s failed: %s", rid, detail, exc_info=exc)
    return APIError(500, f"the server failed to handle this request (request id {rid}); its log has the details",
                    code=code, headers={"X-Request-Id": rid})


_BRANCHES = {"int", "float", "str", "bool", "list", "dict", "none", "is-instance"}


def _branch_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _BRANCHES or "[" in part)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    # Drop "body" and pydantic's union-branch tags ("int", "literal['auto']", "function-after[...]").
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and not _branch_tag(p)]
    param = ".".join(loc) or None
    msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    return (f"{param}: {msg}" if param else msg), param


def install_error_handlers(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, APIError)
        return exc.response()

    async def engine_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, EngineError)
        return APIError.from_engine(exc).response()

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return APIError(400, message, param=param, code="invalid_value").response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return APIError(exc.status_code, str(exc.detail), headers=dict(exc.headers or {})).response()

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return internal_error(f"unhandled {type(exc).__name__}: {exc}", exc=exc).response()

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(EngineError, engine_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
