"""Fixtures for the hardening tests: the live server of sechelp.py, its owners' uploaded training files."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from livejobs import start_server  # noqa: E402
from sechelp import ADMIN, ALICE, BASE, BOB, CAROL, LIMITS, Live  # noqa: E402
from tiny import chat_rows, save_tiny, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def sec_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("security")
    keys = root / "keys.txt"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n{CAROL} carol\n{ADMIN} ops admin\n")
    return {"root": root, "model": save_tiny(root / "tiny"), "keys": keys,
            "train": write_jsonl(root / "train.jsonl", chat_rows(20))}


# One server per test module, not per session: it and the jobs' training processes it started end with the
# module, so nothing of theirs keeps running (and taking CPU) while the rest of the suite runs.
@pytest.fixture(scope="module")
def live(sec_env: dict[str, Path], request: pytest.FixtureRequest) -> Iterator[Live]:
    data = sec_env["root"] / f"data-{request.module.__name__}"
    srv = start_server(sec_env["model"], data, sec_env["keys"], "--dtype", "fp32",
                       "--workers", "1", *LIMITS, max_steps=None, base=BASE)
    assert srv.url.startswith("http://127.0.0.1:")
    yield Live(srv.url, srv.lines)
    srv.stop()


@pytest.fixture(scope="module")
def alice_file(live: Live, sec_env: dict[str, Path]) -> str:
    with sec_env["train"].open("rb") as f:
        return live.client(ALICE).files.create(file=f, purpose="fine-tune").id


@pytest.fixture(scope="module")
def bob_file(live: Live, sec_env: dict[str, Path]) -> str:
    with sec_env["train"].open("rb") as f:
        return live.client(BOB).files.create(file=f, purpose="fine-tune").id


