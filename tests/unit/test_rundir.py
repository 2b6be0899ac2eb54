"""RunDir: one owner for a run folder's layout (weights kind, checkpoints/step-N, metric events, resume trim)."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.rundir import (
    ResumeEvent,
    RunDir,
    TrainEvent,
    ValidEvent,
    WarningEvent,
    checkpoint_name,
    event_row,
    parse_event,
    parse_step,
)


def test_weights_kind_and_checkpoints(tmp_path: Path) -> None:
    rd = RunDir(str(tmp_path / "run"))
    assert rd.path == tmp_path / "run" and rd.weights is None and not rd.is_finished()
    (rd.path / "model").mkdir(parents=True)
    (rd.path / "model" / "config.json").write_text("{}")
    assert rd.full_model == rd.path / "model" and rd.adapter is None
    (rd.path / "adapter").mkdir()
    (rd.path / "adapter" / "adapter_config.json").write_text("{}")
    assert rd.adapter == rd.path / "adapter"  # an adapter folder wins: the run trained an adapter
    rd.state_path.write_text(json.dumps({"best_step": 2}))
    assert rd.is_finished() and rd.best_step() == 2
    for step in (10, 2):
        d = rd.checkpoint_dir(step)
        d.mkdir(parents=True)
        (d / "state.json").write_text("{}")
    (rd.checkpoints_dir / ".tmp-step-000011").mkdir()  # a write in progress is no checkpoint
    (rd.checkpoints_dir / checkpoint_name(12)).mkdir()  # nor one without its state
    assert [c.step for c in rd.checkpoints()] == [2, 10]
    assert rd.latest_checkpoint() is not None and rd.latest_checkpoint().path.name == "step-000010"  # type: ignore[union-attr]
    assert parse_step("step-000010") == 10 and parse_step(".tmp-step-000011") is None and parse_step("step-x") is None


def test_metric_events_round_trip() -> None:
    events = [ValidEvent(0, {"loss": 2.0}, baseline=True), TrainEvent(1, {"loss": 1.5, "token_acc": 0.2}, lr=1e-3),
              ValidEvent(1, {"loss": 1.4}), WarningEvent(1, "overfitting"), ResumeEvent(1, {"epoch": 0})]
    rows = [event_row(e) for e in events]
    assert rows[0] == {"step": 0, "baseline": True, "valid_loss": 2.0}
    assert rows[1] == {"step": 1, "lr": 1e-3, "train_loss": 1.5, "train_token_acc": 0.2}
    assert [parse_event(r) for r in rows] == events


def test_drop_metrics_after_keeps_rows_up_to_the_checkpoint(tmp_path: Path) -> None:
    rd = RunDir(tmp_path)
    for ev in (ValidEvent(0, {"loss": 2.0}, baseline=True), TrainEvent(1, {"loss": 1.0}), TrainEvent(2, {"loss": 0.9}),
               ValidEvent(2, {"loss": 1.1}), TrainEvent(3, {"loss": 0.8})):
        rd.append_metric(ev)
    with rd.metrics_path.open("a") as f:
        f.write('{"step": 4, "train_lo')  # cut short by kill -9
    assert rd.drop_metrics_after(2) == 2
    assert [(type(e).__name__, e.step) for e in rd.metrics()] == [
        ("ValidEvent", 0), ("TrainEvent", 1), ("TrainEvent", 2), ("ValidEvent", 2)]
    assert rd.drop_metrics_after(2) == 0
