"""`tunelab train` prints the memory estimate before step 1 and warns when it exceeds free memory."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import tiny
from rich.console import Console

from tunelab.config import config_from_dict
from tunelab.train.run import train


def _cfg(tmp_path: Path, tiny_dir: Path) -> Any:
    f = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.chat_rows(8))
    return config_from_dict({
        "model": {"name": str(tiny_dir), "dtype": "fp32"}, "lora": {"r": 4, "alpha": 8},
        "data": {"train": str(f), "max_seq_len": 64, "min_examples": 1},
        "train": {"max_steps": 1, "batch_size": 4}, "eval": {"baseline": False}, "output_dir": str(tmp_path / "run"),
    })


def _run(cfg: Any) -> str:
    buf = io.StringIO()
    train(cfg, console=Console(file=buf, width=200), show_progress=False)
    return buf.getvalue()


def test_estimate_printed_before_step_1(tmp_path: Path, tiny_dir: Path) -> None:
    out = _run(_cfg(tmp_path, tiny_dir))
    assert "memory estimate:" in out and "GB peak per process" in out
    assert "warning: the estimate" not in out


def test_warns_when_the_estimate_exceeds_free_memory(tmp_path: Path, tiny_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import tunelab.plan.fromconfig as fc

    monkeypatch.setattr(fc, "free_bytes", lambda device: 1000)
    out = _run(_cfg(tmp_path, tiny_dir))
    assert "warning: the estimate" in out and "exceeds the free RAM memory" in out
    assert (tmp_path / "run" / "adapter").is_dir()  # a warning, never a refusal
