"""Fixtures for the hardening tests: the live server of sechelp.py, its owners' uploaded training files."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from sechelp import ADMIN, ALICE, BASE, BOB, CAROL, LIMITS, Live  # noqa: E402
from tiny import chat_rows, save_tiny, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def sec_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("security")
    keys = root / "keys.txt"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n{CAROL} carol\n{ADMIN} ops admin\n")
    return {"root": root, "model": save_tiny(root / "tiny"), "keys": keys,
            "train": write_jsonl(root / "train.jsonl", chat_rows(20))}


@pytest.fixture(scope="session")
def live(sec_env: dict[str, Path]) -> Iterator[Live]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-c", "from tunelab.cli import main; main()", "serve", "--host", "127.0.0.1", "--port", "0",
           "--model", str(sec_env["model"]), "--served-model-name", BASE, "--dtype", "fp32",
           "--data-dir", str(sec_env["root"] / "data"), "--api-keys-file", str(sec_env["keys"]), "--workers", "1",
           *LIMITS]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[str] = []
    ready = threading.Event()

    def reader() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if line.startswith("try:"):
                ready.set()
        ready.set()

    threading.Thread(target=reader, daemon=True).start()
    ready.wait(180)
    url = next((m.group(1) for m in (re.match(r"serving on (\S+)", ln) for ln in lines) if m), None)
    if url is None:
        proc.kill()
        raise AssertionError("server did not start:\n" + "\n".join(lines))
    assert url.startswith("http://127.0.0.1:")
    yield Live(url, lines)
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


@pytest.fixture(scope="session")
def alice_file(live: Live, sec_env: dict[str, Path]) -> str:
    with sec_env["train"].open("rb") as f:
        return live.client(ALICE).files.create(file=f, purpose="fine-tune").id


@pytest.fixture(scope="session")
def bob_file(live: Live, sec_env: dict[str, Path]) -> str:
    with sec_env["train"].open("rb") as f:
        return live.client(BOB).files.create(file=f, purpose="fine-tune").id


