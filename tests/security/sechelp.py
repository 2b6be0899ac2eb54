"""Helpers of the hardening tests (fixtures in conftest.py): the live server's keys and limits (a `tunelab serve
--data-dir` subprocess on 127.0.0.1 with owners alice, bob and carol, an admin key and small per-owner limits),
an in-process live server (uvicorn in a thread) for tests that must reach inside the engine, and body makers."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import uvicorn
from openai import OpenAI

ALICE, BOB, CAROL, ADMIN = "sk-alice-1", "sk-bob-2", "sk-carol-3", "sk-admin-4"
BASE = "tiny"
MAX_UPLOAD = 150_000  # --max-upload-bytes
LIMITS = ["--max-upload-bytes", str(MAX_UPLOAD), "--max-jobs-per-owner", "2", "--max-files-per-owner", "5",
          "--max-bytes-per-owner", "200000", "--max-tokens-limit", "64"]


class Live:
    """A server reachable at `url` (its /v1 base)."""

    def __init__(self, url: str, lines: list[str] | None = None) -> None:
        self.url, self.lines = url, lines or []
        self.root = url.removesuffix("/v1")

    def client(self, key: str = ALICE, timeout: float = 60) -> OpenAI:
        return OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=timeout)

    def http(self, key: str | None = ALICE, timeout: float = 60) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.root, headers=headers, timeout=timeout)


class InProcess:
    """uvicorn serving `app` from a thread of this process, on 127.0.0.1 and a free port."""

    def __init__(self, app: Any) -> None:
        from tunelab.server.run import base_url, bind

        self.sock = bind("127.0.0.1", 0)
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not self.server.started and time.time() < deadline:
            time.sleep(0.05)
        assert self.server.started, "in-process server did not start"
        self.live = Live(base_url(self.sock, "127.0.0.1"))

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.sock.close()


def deep_json(depth: int) -> str:
    return '{"a": ' + "[" * depth + "]" * depth + "}"


def error_of(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) == {"error"}, body
    err: dict[str, Any] = body["error"]
    assert err["code"], f"an error without a code: {err}"
    return err


def multipart(content: bytes, purpose: str = "fine-tune", filename: str = "train.jsonl") -> tuple[bytes, str]:
    """A multipart/form-data body with `file` and `purpose`, and its content type."""
    boundary = "tunelab-security-boundary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n{purpose}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{filename}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + content + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def chunked(body: bytes, size: int = 65536) -> Iterator[bytes]:
    """The body as a generator: httpx then sends it chunked, with no Content-Length."""
    for i in range(0, len(body), size):
        yield body[i:i + size]
