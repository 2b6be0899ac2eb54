"""A live `tunelab serve` for tests (uvicorn in a subprocess on 127.0.0.1, a free port) and the helpers that
wait on it: shared by tests/jobs and tests/security (a module of its own, not a conftest, so that test files
in several folders can import it by one name)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from openai import OpenAI

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


def serve_process(args: list[str], timeout: float = 180) -> tuple[subprocess.Popen[str], str, list[str],
                                                                  threading.Thread]:
    """`tunelab serve ARGS` in a subprocess; returns (process, its /v1 URL, the lines it printed, the reader
    thread) once it prints its URL."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "from tunelab.cli import main; main()", "serve", *args]
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

    thread = threading.Thread(target=reader, daemon=True)
    thread.start()
    found.wait(timeout)
    url = next((m.group(1) for m in (re.match(r"serving on (\S+)", ln) for ln in lines) if m), None)
    if url is None:
        proc.kill()
        raise AssertionError("server did not start:\n" + "\n".join(lines))
    return proc, url, lines, thread


def start_server(model_dir: Path, data_dir: Path, keys_file: Path, *extra: str, timeout: float = 180,
                 max_steps: int | None = 8, base: str = BASE) -> Server:
    """`tunelab serve` on 127.0.0.1 and a free port, the model served as `base`; jobs train `max_steps` steps
    (None: the jobs' own defaults). Returns once the server prints its URL."""
    steps = ["--set", f"train.max_steps={max_steps}"] if max_steps is not None else []
    proc, url, lines, _ = serve_process(
        ["--host", "127.0.0.1", "--port", "0", "--model", str(model_dir), "--served-model-name", base,
         "--data-dir", str(data_dir), "--api-keys-file", str(keys_file), *steps, *extra], timeout)
    return Server(proc, url, lines)


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
