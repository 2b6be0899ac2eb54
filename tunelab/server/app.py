"""`create_app(engine, settings)`: the FastAPI application, with no module globals.

Everything a route needs hangs off `app.state`: `engine` (an `InferenceEngine`), `settings`
(`ServerSettings`), `serving` (`OpenAIServing`) and `draining` (set on SIGTERM by `tunelab.server.run`).

Extension points for other API areas (a fine-tuning jobs API, files, ...):
  * `create_app(engine, settings, extra_routers=[router, ...])` mounts more routers; the app-wide
    `authenticate` dependency guards them too, and OpenAI-style errors apply (raise `APIError`).
  * In a route, `principal: Principal = Depends(authenticate)` tells which key/owner called.
  * `create_app(..., console=False)` leaves out the web console (tunelab.console, mounted at /console).
  * `request.app.state.engine.register_adapter(name, path, owned_by=...)` serves a new adapter at once
    (it appears in /v1/models and can be used as `model`), `unregister_adapter(name)` removes it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

from fastapi import APIRouter, Depends, FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunelab.engine.types import InferenceEngine
from tunelab.server.auth import authenticate
from tunelab.server.errors import APIError, install_error_handlers
from tunelab.server.routes import router as openai_router
from tunelab.server.routing import Routing, metrics_router
from tunelab.server.serving import OpenAIServing
from tunelab.server.settings import ServerSettings

if TYPE_CHECKING:
    from tunelab.registry import Registry


class LimitsMiddleware:
    """Refuses request bodies over `max_request_bytes` (413) and new requests while draining (503).

    Pure ASGI rather than BaseHTTPMiddleware, so streaming responses and disconnects pass through as is.
    The size is checked from Content-Length up front and again while reading (chunked uploads).
    """

    def __init__(self, app: ASGIApp, state: Any) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        settings: ServerSettings = self.state.settings
        limit = settings.max_request_bytes
        if getattr(self.state, "draining", False):
            await _send_error(send, APIError(503, "the server is shutting down", code="shutting_down",
                                             headers={"Connection": "close"}))
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if scope["method"] == "POST" and scope.get("path") in settings.streamed_paths:
            await self._streamed(scope, receive, send, declared, settings.max_streamed_bytes)
            return
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, _too_large(limit))
            return
        # Read the whole body here (it is small by definition) so an oversized chunked upload is refused
        # with 413 before any route parses it; then replay it to the app.
        body = bytearray()
        more = scope["method"] not in ("GET", "HEAD")
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return  # client went away while uploading
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > limit:
                await _send_error(send, _too_large(limit))
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


    async def _streamed(self, scope: Scope, receive: Receive, send: Send, declared: bytes | None, limit: int) -> None:
        """File uploads: refuse by Content-Length up front, otherwise let the route stream the body to disk,
        counting as it goes; past the limit the route sees a disconnect and stores nothing, and the client
        gets the same 413 as with a Content-Length (whatever the route would have answered is dropped)."""
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _send_error(send, _upload_too_large(limit))
            return
        seen = 0
        exceeded = False
        answered = False

        async def counted() -> Message:
            nonlocal seen, exceeded
            if exceeded:
                return {"type": "http.disconnect"}
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > limit:
                exceeded = True
                return {"type": "http.disconnect"}
            return message

        async def guarded(message: Message) -> None:
            nonlocal answered
            if not exceeded:
                await send(message)
            elif not answered:
                answered = True
                await _send_error(send, _upload_too_large(limit))

        await self.app(scope, counted, guarded)
        if exceeded and not answered:  # the route gave up without answering
            await _send_error(send, _upload_too_large(limit))


def _upload_too_large(limit: int) -> APIError:
    return APIError(413, f"the upload exceeds this server's upload limit ({limit} bytes with multipart framing)",
                    param="file", code="file_too_large")


def _too_large(limit: int) -> APIError:
    return APIError(413, f"request body exceeds this server's limit of {limit} bytes", code="request_too_large")


async def _send_error(send: Send, error: APIError) -> None:
    response = error.response()
    await response({"type": "http"}, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - a JSONResponse never reads the request
    return {"type": "http.disconnect"}


def create_app(
    engine: InferenceEngine,
    settings: ServerSettings | None = None,
    *,
    extra_routers: Iterable[APIRouter] = (),
    serving_factory: Callable[[InferenceEngine, ServerSettings], OpenAIServing] = OpenAIServing,
    on_shutdown: Callable[[], Awaitable[None]] | None = None,
    console: bool = True,
    registry: Registry | None = None,
) -> FastAPI:
    """Build the app serving `engine`. The engine's lifetime is the caller's: `create_app` never closes it."""
    settings = settings or ServerSettings()
    open_docs = not settings.api_keys  # the schema pages are not behind auth, so hide them when keys are set
    app = FastAPI(
        title="tunelab OpenAI-compatible server",
        dependencies=[Depends(authenticate)],
        docs_url="/docs" if open_docs else None,
        redoc_url=None,
        openapi_url="/openapi.json" if open_docs else None,
    )
    app.state.engine = engine
    app.state.settings = settings
    # Registry names, the version header and /metrics (tunelab.server.routing); the serving layer's engine is
    # the routing view of `engine`.
    app.state.routing = Routing(engine, registry)
    app.state.serving = serving_factory(app.state.routing.engine_view, settings)
    app.state.draining = False
    install_error_handlers(app)
    app.include_router(openai_router)
    app.include_router(metrics_router)
    for extra in extra_routers:
        app.include_router(extra)
    if console:  # the web console at / (its own cookie sign-in; see tunelab.console)
        from tunelab.console import mount_console

        mount_console(app)
    if on_shutdown is not None:
        app.router.on_shutdown.append(on_shutdown)
    app.add_middleware(LimitsMiddleware, state=app.state)
    return app
