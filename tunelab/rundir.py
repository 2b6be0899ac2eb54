"""A run folder's layout, owned in one place: `RunDir(path)`.

    config.yaml      the resolved, validated config          manifest.json  hashes, versions, seed
    metrics.jsonl    one metric event per line (below)       state.json     the loop state at the end
    tokenizer/       the tokenizer trained with              loss.png       the loss curve
    adapter/         PEFT adapter (LoRA family), or          model/         the whole model (full fine-tuning)
    best/adapter|model   the best validation step's weights (early stopping)
    checkpoints/step-NNNNNN/  adapter|model, optimizer.pt, scheduler.pt, rng.pt, state.json, config.yaml
    eval/            results.json (tunelab eval), judge.json, human.jsonl (tunelab judge)
    report.html      tunelab report

Every reader and writer of a run folder (train, eval, report, jobs, engine, demo) asks this class where
things are, so the adapter/ vs model/ rule and the step-N name are written once.

Metric events (metrics.jsonl) are typed: `TrainEvent` (a step's training metrics), `ValidEvent` (validation
metrics; `baseline` for the base model before step 1), `WarningEvent`, `ResumeEvent` (where a resumed run
picked up). On disk each is one flat JSON object, as before: `{"step": 3, "train_loss": ...}`.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ADAPTER = "adapter"
MODEL = "model"
ADAPTER_CONFIG = "adapter_config.json"
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step-{step:06d}"


def parse_step(name: str) -> int | None:
    """The step of a checkpoint folder name (`step-000012` -> 12), or None for anything else."""
    m = CHECKPOINT_RE.match(name)
    return int(m.group(1)) if m else None


def weights_name(uses_adapter: bool) -> str:
    return ADAPTER if uses_adapter else MODEL


def weights_in(folder: Path) -> Path | None:
    """The trainable weights a run or checkpoint folder holds: its PEFT `adapter/`, else `model/` (full
    fine-tuning), else None."""
    if (folder / ADAPTER / ADAPTER_CONFIG).is_file():
        return folder / ADAPTER
    if (folder / MODEL / "config.json").is_file():
        return folder / MODEL
    return None


# ---------------------------------------------------------------------------------------------- metric events
@dataclass(frozen=True)
class TrainEvent:
    step: int
    metrics: dict[str, float]
    """The method's training metrics without prefix (loss, token_acc, reward ...); written as train_<name>."""
    epoch: float | None = None
    lr: float | None = None
    tokens_per_s: float | None = None
    tokens_seen: int | None = None
    elapsed_s: float | None = None
    grad_norm: float | None = None


@dataclass(frozen=True)
class ValidEvent:
    step: int
    metrics: dict[str, float]
    """Validation metrics without prefix; written as valid_<name>."""
    baseline: bool = False


@dataclass(frozen=True)
class WarningEvent:
    step: int
    warning: str


@dataclass(frozen=True)
class ResumeEvent:
    """A resumed run: the checkpoint step and the data position (epoch, step within it, tokens) it continued from."""

    step: int
    resumed_from: dict[str, Any] = field(default_factory=dict)


MetricEvent = TrainEvent | ValidEvent | WarningEvent | ResumeEvent
_TRAIN_FIELDS = ("epoch", "lr", "tokens_per_s", "tokens_seen", "elapsed_s", "grad_norm")


def event_row(ev: MetricEvent) -> dict[str, Any]:
    """The flat JSON object metrics.jsonl holds for an event."""
    row: dict[str, Any] = {"step": ev.step}
    if isinstance(ev, TrainEvent):
        row.update({k: getattr(ev, k) for k in _TRAIN_FIELDS if getattr(ev, k) is not None})
        row.update({f"train_{k}": v for k, v in ev.metrics.items()})
    elif isinstance(ev, ValidEvent):
        if ev.baseline:
            row["baseline"] = True
        row.update({f"valid_{k}": v for k, v in ev.metrics.items()})
    elif isinstance(ev, WarningEvent):
        row["warning"] = ev.warning
    else:
        row["resumed_from"] = ev.resumed_from
    return row


def parse_event(row: dict[str, Any]) -> MetricEvent | None:
    """The event a metrics.jsonl object holds, or None when it is none of them."""
    try:
        step = int(row.get("step", 0))
    except (TypeError, ValueError):
        return None
    if "warning" in row:
        return WarningEvent(step, str(row["warning"]))
    if "resumed_from" in row:
        return ResumeEvent(step, dict(row["resumed_from"] or {}))
    train = {k[6:]: v for k, v in row.items() if k.startswith("train_")}
    if train:
        return TrainEvent(step, train, **{k: row[k] for k in _TRAIN_FIELDS if k in row})
    valid = {k[6:]: v for k, v in row.items() if k.startswith("valid_")}
    if valid:
        return ValidEvent(step, valid, baseline=bool(row.get("baseline")))
    return None


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(line) if line.strip() else None
        except ValueError:
            continue  # a line cut short by a kill
        if isinstance(obj, dict):
            rows.append(obj)
    return rows


# ---------------------------------------------------------------------------------------------- the folder
@dataclass(frozen=True)
class Checkpoint:
    path: Path
    step: int

    @property
    def weights(self) -> Path | None:
        return weights_in(self.path)

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"


class RunDir:
    """A tunelab run folder (see the module docstring for its layout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    # where things are
    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def manifest_path(self) -> Path:
        return self.path / "manifest.json"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def state_path(self) -> Path:
        return self.path / "state.json"

    @property
    def tokenizer_dir(self) -> Path:
        return self.path / "tokenizer"

    @property
    def loss_plot_path(self) -> Path:
        return self.path / "loss.png"

    @property
    def checkpoints_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def mix_answers_path(self) -> Path:
        """The base model's own answers for `data.mix.answers: self`, generated before step 1 (a resume reuses them)."""
        return self.path / "mix_answers.jsonl"

    @property
    def eval_dir(self) -> Path:
        return self.path / "eval"

    @property
    def results_path(self) -> Path:
        return self.eval_dir / "results.json"

    @property
    def report_path(self) -> Path:
        return self.path / "report.html"

    def output_dir(self, name: str) -> Path:
        """Where the final weights of kind `name` (adapter or model) go."""
        return self.path / name

    def best_dir(self, name: str) -> Path:
        return self.path / "best" / name

    def checkpoint_dir(self, step: int) -> Path:
        return self.checkpoints_dir / checkpoint_name(step)

    # what is there
    def is_run(self) -> bool:
        return self.config_path.is_file()

    @property
    def weights(self) -> Path | None:
        """The finished run's weights: adapter/ or model/, or None before the run has finished."""
        return weights_in(self.path)

    @property
    def adapter(self) -> Path | None:
        w = self.weights
        return w if w is not None and w.name == ADAPTER else None

    @property
    def full_model(self) -> Path | None:
        w = self.weights
        return w if w is not None and w.name == MODEL else None

    def is_finished(self) -> bool:
        return self.weights is not None and self.state_path.is_file()

    def checkpoints(self) -> list[Checkpoint]:
        """Complete checkpoints (those with a state.json), oldest first."""
        d = self.checkpoints_dir
        if not d.is_dir():
            return []
        found = [Checkpoint(p, s) for p in d.iterdir() if (s := parse_step(p.name)) is not None]
        return sorted((c for c in found if c.state_path.is_file()), key=lambda c: c.step)

    def latest_checkpoint(self) -> Checkpoint | None:
        found = self.checkpoints()
        return found[-1] if found else None

    def read_state(self) -> dict[str, Any] | None:
        try:
            st = json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return None
        return st if isinstance(st, dict) else None

    def best_step(self) -> int | None:
        """The best validation step: from state.json, else from the newest checkpoint that records one."""
        for cand in [self.state_path, *(c.state_path for c in reversed(self.checkpoints()))]:
            try:
                st = json.loads(cand.read_text())
            except (OSError, ValueError):
                continue
            if isinstance(st, dict) and st.get("best_step") is not None:
                return int(st["best_step"])
        return None

    # metrics
    def metric_rows(self) -> list[dict[str, Any]]:
        """metrics.jsonl as JSON objects (a line cut short by a kill is skipped)."""
        return _read_rows(self.metrics_path)

    def metrics(self) -> list[MetricEvent]:
        return [ev for r in self.metric_rows() if (ev := parse_event(r)) is not None]

    def append_metric(self, ev: MetricEvent | dict[str, Any]) -> None:
        row = ev if isinstance(ev, dict) else event_row(ev)
        self.path.mkdir(parents=True, exist_ok=True)
        with self.metrics_path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")

    def drop_metrics_after(self, step: int) -> int:
        """Keep only the metric rows up to `step` (a resume from the checkpoint at `step` logs the later ones
        again), and a line cut short by a kill goes too; atomic. Returns how many rows were dropped."""
        p = self.metrics_path
        if not p.is_file():
            return 0
        kept, dropped = [], 0
        for line in p.read_text(encoding="utf-8").splitlines():
            try:
                obj = json.loads(line) if line.strip() else None
            except ValueError:
                obj = None
            if not isinstance(obj, dict) or int(obj.get("step", 0) or 0) > step:
                dropped += 1 if line.strip() else 0
                continue
            kept.append(line)
        if dropped:
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text("".join(k + "\n" for k in kept), encoding="utf-8")
            os.replace(tmp, p)
        return dropped
