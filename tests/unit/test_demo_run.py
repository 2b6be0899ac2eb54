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


def test_demo_config_mixes_general_data_and_takes_overrides(tmp_path: Path) -> None:
    from tunelab.eval.general import general_path

    cfg = demo.demo_config(tmp_path / "demo", steps=None)
    assert cfg.data.mix is not None and 0 < cfg.data.mix.fraction < 1
    assert Path(cfg.data.mix.path).resolve() == general_path("train")
    assert cfg.data.mix.answers == "self"  # the measured choice: the base model's own answers (docs/benchmarks.md)
    cfg = demo.demo_config(tmp_path / "demo", steps=3, overrides=["data.mix=null", "lora.r=4"])
    assert cfg.data.mix is None and cfg.lora.r == 4 and cfg.train.max_steps == 3


def _results(n: int) -> dict[str, Any]:
    def target(name: str, kind: str, acc: float) -> dict[str, Any]:
        metrics = {"json_valid": acc, "schema": acc, "field_accuracy": acc}
        return {"name": name, "kind": kind, "metrics": metrics, "general": {"n": 60, "accuracy": acc}}

    examples = [
        {"index": j, "prompt": [{"role": "user", "content": f"note {j}"}], "reference": f"ref {j}",
         "outputs": {"base": f"prose {j}", "demo": f"json {j}"},
         "scores": {"base": {"schema": 0.0}, "demo": {"schema": float(j % 2)}}}
        for j in range(n)
    ]
    return {"n_examples": n, "targets": [target("base", "base", 0.0), target("demo", "run", 1.0)], "examples": examples}


def test_table_shows_the_first_three_test_notes_whatever_their_scores() -> None:
    console = Console(record=True, width=200)
    demo.print_table(_results(5), console)
    text = console.export_text()
    for j in range(3):
        assert f"test note {j + 1}: note {j}" in text and f"json {j}" in text and f"ref {j}" in text
    assert ": note 3" not in text and ": note 4" not in text  # three, chosen by position, not by score
    assert "fine-tuned (NOT schema-valid): json 0" in text and "fine-tuned (valid): json 1" in text
    assert "general questions (60)" in text and "100.0%" in text
