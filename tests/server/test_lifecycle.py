"""A real uvicorn over the FakeEngine: client disconnects cancel generation (streamed or not), SIGTERM
drains in-flight requests within --shutdown-timeout, and the server package never imports torch."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fake_engine import FakeEngine

from tunelab.server import create_app
from tunelab.server.run import base_url, bind


def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.02)
    return cond()


@pytest.fixture
def served() -> Iterator[tuple[FakeEngine, str]]:
    engine = FakeEngine(token_delay=0.02)
    sock = bind("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(create_app(engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    assert wait_for(lambda: server.started)
    yield engine, base_url(sock, "127.0.0.1")
    server.should_exit = True
    thread.join(10)


LONG = "word " * 300


def test_stream_disconnect_cancels_generation(served: tuple[FakeEngine, str]) -> None:
    engine, url = served
    body = {"model": "fake-a", "prompt": LONG, "max_tokens": 300, "stream": True}
    with httpx.Client(timeout=10) as http, http.stream("POST", f"{url}/completions", json=body) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: ")
            if seen == 3:
                break
    assert wait_for(lambda: len(engine.cancelled) == 1 and engine.active == 0)


def test_non_stream_disconnect_cancels_generation(served: tuple[FakeEngine, str]) -> None:
    engine, url = served
    body = {"model": "fake-b", "messages": [{"role": "user", "content": LONG}], "max_tokens": 300, "n": 2}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{url}/chat/completions", json=body, timeout=0.5)
    assert wait_for(lambda: len(engine.cancelled) == 2 and engine.active == 0)


SERVE_FAKE = textwrap.dedent("""
    import sys
    sys.path.insert(0, sys.argv[2])  # tests/: the fake engine lives with the tests, not in the package
    from fake_engine import FakeEngine
    from tunelab.server import create_app
    from tunelab.server.run import serve
    serve(create_app(FakeEngine(token_delay=0.02)), port=0, shutdown_timeout=int(sys.argv[1]),
          on_listening=lambda url: print("serving on", url, flush=True))
    print("server stopped; torch imported:", "torch" in sys.modules, flush=True)
""")


def start_fake_server(shutdown_timeout: int) -> tuple[subprocess.Popen[str], str]:
    tests_dir = str(Path(__file__).resolve().parents[1])
    proc = subprocess.Popen([sys.executable, "-c", SERVE_FAKE, str(shutdown_timeout), tests_dir], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline()
    m = re.match(r"serving on (\S+)", line)
    assert m, line + proc.stdout.read()
    return proc, m.group(1)


def stream_then_sigterm(proc: subprocess.Popen[str], url: str, max_tokens: int) -> tuple[list[str], bool]:
    body = {"model": "fake-a", "prompt": LONG, "max_tokens": max_tokens, "stream": True}
    got: list[str] = []
    refused = False
    try:
        with httpx.Client(timeout=30) as http, http.stream("POST", f"{url}/completions", json=body) as r:
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    got.append(line)
                    break
            proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
            try:
                httpx.get(f"{url}/models", timeout=2)
            except httpx.TransportError:
                refused = True  # the listening socket is closed: no new requests
            got.extend(line for line in lines if line.startswith("data: "))
    except httpx.TransportError:
        pass  # the server cut the stream at the shutdown timeout
    return got, refused


def test_sigterm_drains_in_flight_stream_then_exits_cleanly() -> None:
    proc, url = start_fake_server(shutdown_timeout=30)
    got, refused = stream_then_sigterm(proc, url, max_tokens=60)  # ~1.2 s of streaming after SIGTERM
    assert refused
    assert got[-1] == "data: [DONE]" and '"finish_reason": "length"' in got[-2]
    assert proc.wait(timeout=30) == 0
    assert proc.stdout is not None and "server stopped; torch imported: False" in proc.stdout.read()


def test_shutdown_timeout_bounds_the_drain() -> None:
    proc, url = start_fake_server(shutdown_timeout=1)
    start = time.monotonic()
    got, _ = stream_then_sigterm(proc, url, max_tokens=300)  # would stream for ~6 s
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - start < 5
    assert "data: [DONE]" not in got
