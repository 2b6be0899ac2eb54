"""A live `tunelab serve` (uvicorn in a subprocess on 127.0.0.1, a free port) on a tiny Llama saved to a
temp folder, with two API keys (owners alice and bob), plus the guide's JSONL files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI
from tiny import chat_rows, save_tiny, write_jsonl

ALICE, BOB = "sk-alice-1", "sk-bob-2"
BASE = "tiny-llama"
TERMINAL = ("succeeded", "failed", "cancelled")


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, lines: list[str]) -> None:
        self.proc, self.url, self.lines = proc, url, lines

    def client(self, key: str = ALICE) -> OpenAI:
        return OpenAI(base_url=self.url, api_key=key, max_retries=0, timeout=60)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def start_server(model_dir: Path, data_dir: Path, keys_file: Path, *extra: str, timeout: float = 180) -> Server:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "from tunelab.cli import main; main()", "serve", "--port", "0",
           "--model", str(model_dir), "--served-model-name", BASE, "--data-dir", str(data_dir),
           "--api-keys-file", str(keys_file), "--set", "train.max_steps=8", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    found = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("try:"):
                found.set()
        found.set()

    threading.Thread(target=reader, daemon=True).start()
    found.wait(timeout)
    url = next((m.group(1) for m in (re.match(r"serving on (\S+)", ln) for ln in lines) if m), None)
    if url is None:
        proc.kill()
        raise AssertionError("server did not start:\n" + "\n".join(lines))
    return Server(proc, url, lines)


@pytest.fixture(scope="session")
def jobs_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("jobs")
    model = save_tiny(root / "tiny")
    keys = root / "keys.txt"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n")
    write_jsonl(root / "train.jsonl", chat_rows(20))
    write_jsonl(root / "val.jsonl", chat_rows(4, seed=1))
    bad = [*chat_rows(12)]
    bad[2] = {"messages": [{"role": "wizard", "content": "hi"}, {"role": "assistant", "content": "x"}]}
    write_jsonl(root / "bad.jsonl", bad)
    return {"root": root, "model": model, "keys": keys}


@pytest.fixture(scope="module")
def server(jobs_env: dict[str, Path]) -> Iterator[Server]:
    srv = start_server(jobs_env["model"], jobs_env["root"] / "data", jobs_env["keys"], "--workers", "1",
                       "--max-upload-bytes", "200000")
    yield srv
    srv.stop()


def wait_for(fn: Any, timeout: float = 150, interval: float = 0.3, what: str = "condition") -> Any:
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_status(client: OpenAI, job_id: str, statuses: tuple[str, ...] = TERMINAL, timeout: float = 150) -> Any:
    return wait_for(lambda: (j := client.fine_tuning.jobs.retrieve(job_id)).status in statuses and j,
                    timeout=timeout, what=f"{job_id} to reach {statuses}")
