"""Metrics out: `metrics.jsonl` always (one JSON object per line), TensorBoard and MLflow when asked
(`track: [tensorboard, mlflow]`; MLflow uses a local SQLite store, RUN/mlflow.db, unless `mlflow_uri` is set),
and a loss-curve PNG at the end.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.rundir import MetricEvent, RunDir, event_row


class Tracker:
    def __init__(self, run_dir: Path, backends: list[str], config: dict[str, Any], mlflow_uri: str | None,
                 enabled: bool = True) -> None:
        self.run = RunDir(run_dir)
        self.path = self.run.metrics_path
        self.enabled = enabled
        self.tb: Any = None
        self.mlflow: Any = None
        if not enabled:
            return
        if "tensorboard" in backends:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as e:
                raise TunelabError("track: tensorboard needs the tensorboard package (pip install tensorboard)", 2) from e
            self.tb = SummaryWriter(str(run_dir / "tensorboard"))
        if "mlflow" in backends:
            try:
                import mlflow
            except ImportError as e:
                raise TunelabError("track: mlflow needs the mlflow package (pip install mlflow)", 2) from e
            # A local SQLite store in the run folder: MLflow's file store is deprecated.
            mlflow.set_tracking_uri(mlflow_uri or f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
            mlflow.set_experiment("tunelab")
            self.mlflow = mlflow
            mlflow.start_run(run_name=run_dir.name)
            flat = _flatten(config)
            mlflow.log_params({k: str(v)[:250] for k, v in list(flat.items())[:100]})

    def log(self, event: MetricEvent | dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = event if isinstance(event, dict) else event_row(event)
        self.run.append_metric(row)
        step = int(row.get("step", 0))
        nums = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool) and k != "step"}
        if self.tb is not None:
            for k, v in nums.items():
                self.tb.add_scalar(k, v, step)
            self.tb.flush()
        if self.mlflow is not None:
            self.mlflow.log_metrics({k: v for k, v in nums.items() if math.isfinite(v)}, step=step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
        if self.mlflow is not None:
            self.mlflow.end_run()


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    return RunDir(run_dir).metric_rows()


def plot_loss(run_dir: Path, best_step: int | None = None) -> Path | None:
    rows = read_metrics(run_dir)
    tr = [(r["step"], r["train_loss"]) for r in rows if "train_loss" in r]
    va = [(r["step"], r["valid_loss"]) for r in rows if "valid_loss" in r]
    if not tr and not va:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    if tr:
        ax.plot(*zip(*tr, strict=True), label="train loss", lw=1)
    if va:
        ax.plot(*zip(*va, strict=True), "o-", label="validation loss")
        base = [r["valid_loss"] for r in rows if r.get("baseline")]
        if base:
            ax.axhline(base[0], ls="--", c="grey", label="baseline (base model)")
    if best_step is not None:
        ax.axvline(best_step, ls=":", c="green", label=f"best step {best_step}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    fig.tight_layout()
    out = RunDir(run_dir).loss_plot_path
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
