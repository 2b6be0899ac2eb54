"""Fixtures: a live `tunelab serve` (tests/livejobs.py) on a tiny Llama saved to a temp folder, with two API
keys (owners alice and bob), plus the guide's JSONL files."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from livejobs import ALICE, BOB, Server, start_server
from tiny import chat_rows, save_tiny, write_jsonl


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


