"""Server tests reuse the tiny LoRA fixtures of tests/engine (tiny Llama folder + two random adapters)."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "engine"))

from lora_fixtures import make_adapter, make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def lora_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapters(lora_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(lora_base_dir, root / "alpha", seed=1)
    make_adapter(lora_base_dir, root / "beta" / "adapter", seed=2)
    return root


@contextmanager
def live_app(app: Any, timeout: float = 30) -> Iterator[str]:
    """Serve a FastAPI app with uvicorn in a thread on 127.0.0.1 (a free port); yields its /v1 base URL."""
    import uvicorn

    from tunelab.server.run import base_url, bind

    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.time() + timeout
    while not server.started and time.time() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    try:
        yield base_url(sock, "127.0.0.1")
    finally:
        server.should_exit = True
        thread.join(10)


@pytest.fixture(scope="session")
def serve_live() -> Any:
    """`live_app` as a fixture: test modules cannot import it by name (every test folder has a conftest)."""
    return live_app
