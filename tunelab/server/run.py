"""Run an app under uvicorn with a graceful SIGTERM: stop taking new requests, let in-flight ones finish
(streams included) for up to `shutdown_timeout` seconds, then cancel what is left and return.

Binds the socket itself, so port 0 works and the caller learns the real address before serving starts.
"""

from __future__ import annotations

import signal
import socket
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI


class _DrainingServer(uvicorn.Server):
    """uvicorn closes the listening socket on SIGTERM; we also refuse new requests on kept-alive
    connections (503 via `app.state.draining`) while in-flight ones finish."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self._app = app

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self._app.state.draining = True
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal after shutdown, killing the process before the caller can close the
        # engine; a SIGTERM-initiated drain is a normal stop, so the caller returns and exits 0.
        if sig == signal.SIGTERM:
            self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]


def bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        from tunelab.errors import TunelabError

        raise TunelabError(f"cannot listen on {host}:{port}: {e.strerror or e}", 2) from e
    # Listen now: clients told the address below may connect before uvicorn's startup has finished.
    sock.listen(2048)
    return sock


def base_url(sock: socket.socket, host: str) -> str:
    port = sock.getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}/v1"


def serve(
    app: FastAPI,
    host: str = "127.0.0.1",
    port: int = 8000,
    *,
    shutdown_timeout: int = 30,
    log_level: str = "warning",
    access_log: bool = False,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve until SIGINT/SIGTERM; returns after the graceful shutdown."""
    sock = bind(host, port)
    config = uvicorn.Config(
        app,
        log_level=log_level,
        access_log=access_log,
        timeout_graceful_shutdown=max(0, shutdown_timeout),
        lifespan="on",
    )
    server = _DrainingServer(config, app)
    if on_listening is not None:
        on_listening(base_url(sock, host))
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
