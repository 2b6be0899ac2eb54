"""`make demo` never deletes an earlier demo's results: a finished run is kept beside the new one, an
interrupted one is resumed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from tunelab.demo import run as demo


def test_finished_demo_is_kept_and_interrupted_one_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict[str, Any]] = []

    def fake_train(cfg: Any, *, resume: bool, overwrite: bool, console: Any) -> Any:
        calls.append({"resume": resume, "overwrite": overwrite})
        return type("R", (), {"run_dir": Path(cfg.output_dir)})()

    monkeypatch.setattr("tunelab.train.run.train", fake_train)
    out = tmp_path / "demo"
    (out / "adapter").mkdir(parents=True)
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "state.json").write_text("{}")
    (out / "report.html").write_text("earlier results")
    cfg = demo.demo_config(out, steps=1)
    demo._train(cfg, Console(quiet=True))
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("demo.")]
    assert len(kept) == 1 and (kept[0] / "report.html").read_text() == "earlier results"
    assert not out.exists() and calls[-1] == {"resume": False, "overwrite": True}

    (out / "checkpoints" / "step-000010").mkdir(parents=True)  # interrupted: a checkpoint, no final adapter
    (out / "checkpoints" / "step-000010" / "state.json").write_text("{}")
    demo._train(cfg, Console(quiet=True))
    assert calls[-1] == {"resume": True, "overwrite": False} and out.exists()
