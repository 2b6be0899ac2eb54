"""Helpers for the data toolkit tests: write rows, read JSONL back, and check rows in = rows out + rejected."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def read_jsonl(path: str | Path) -> list[Any]:
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text(encoding="utf-8").splitlines() if line.strip()]


def write_rows(path: Path, rows: list[Any]) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for r in rows:
            f.write((r if isinstance(r, str) else json.dumps(r)) + "\n")
    return path


def chat(user: str, assistant: str = "Sure, here is the answer.") -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def assert_accounted(n_in: int, output: Path, rejects: Path) -> tuple[list[Any], list[Any]]:
    """Every input row is in the output or (dropped) in the rejects file; audit-only entries don't count."""
    out = read_jsonl(output)
    rej = [r for r in read_jsonl(rejects) if r["reason"] != "pii_replaced"]
    assert n_in == len(out) + len(rej), (n_in, len(out), len(rej))
    return out, rej
