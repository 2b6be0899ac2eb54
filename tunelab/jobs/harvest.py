"""Reading what a training child writes, as pure functions: metrics.jsonl lines -> job events (incrementally,
from a byte offset, never repeating a step after a resume), checkpoint metrics, and the result CSV.

metrics.jsonl is the training loop's own log (tunelab.train.tracking): a `baseline` line at step 0, a train line
per step (`train_loss`, `train_token_acc`, `lr`, `tokens_seen`), a validation line (`valid_loss`,
`valid_token_acc`) after the train line of each evaluation step, and `warning` lines.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Cursor:
    """How far metrics.jsonl has been turned into events: bytes consumed and the last steps reported."""

    offset: int = 0
    last_train: int = 0
    last_valid: int = -1


@dataclass(frozen=True)
class Event:
    message: str
    type: str = "message"  # message | metrics
    level: str = "info"
    data: dict[str, Any] | None = None


def _whole_lines(path: Path, offset: int) -> list[tuple[int, dict[str, Any]]]:
    """(end offset, parsed object) for each complete line after `offset`; a line still being written waits."""
    with path.open("rb") as f:
        f.seek(offset)
        blob = f.read()
    out: list[tuple[int, dict[str, Any]]] = []
    pos = 0
    while (nl := blob.find(b"\n", pos)) >= 0:
        try:
            obj = json.loads(blob[pos:nl])
            out.append((offset + nl + 1, obj if isinstance(obj, dict) else {}))
        except json.JSONDecodeError:
            out.append((offset + nl + 1, {}))
        pos = nl + 1
    return out


def read_metrics(path: Path, cursor: Cursor, *, total: int, has_valid: bool, eval_every: int | None,
                 final: bool) -> tuple[list[Event], Cursor]:
    """New events since `cursor`, and the cursor after them.

    A train line at an evaluation step is merged with the validation line that follows it into one metrics
    event (OpenAI's carry train and validation loss together); while that line has not been written yet the
    train line waits, unless the child has ended (`final`) or the next line shows the validation never came
    (a run killed mid-evaluation and resumed). Steps at or below the last reported one are skipped: a run
    resumed from a checkpoint logs those steps again.
    """
    if not path.exists():
        return [], cursor
    lines = _whole_lines(path, cursor.offset)
    events: list[Event] = []
    offset, last_train, last_valid = cursor.offset, cursor.last_train, cursor.last_valid
    i = 0
    while i < len(lines):
        end, m = lines[i]
        step = int(m.get("step", 0) or 0)
        if "warning" in m:
            events.append(Event(str(m["warning"]), level="warn"))
        elif m.get("baseline"):
            if step > last_valid:
                last_valid = step
                events.append(Event(f"Baseline (before training): validation loss={m.get('valid_loss', math.nan):.4f}",
                                    data={"step": step, "baseline": True, "valid_loss": m.get("valid_loss")}))
        elif "train_loss" in m:
            valid_row = None
            if has_valid and (step == total or bool(eval_every and step % eval_every == 0)):
                if i + 1 < len(lines):
                    nxt = lines[i + 1][1]
                    if nxt.get("step") == step and "valid_loss" in nxt and "train_loss" not in nxt:
                        valid_row, end = nxt, lines[i + 1][0]
                        i += 1
                elif not final:
                    break  # its validation line is not written yet
            if step > last_train:
                last_train = step
                data: dict[str, Any] = {"step": step, "total_steps": total, "train_loss": m["train_loss"],
                                        "train_mean_token_accuracy": m.get("train_token_acc"),
                                        "learning_rate": m.get("lr"), "tokens_seen": m.get("tokens_seen")}
                msg = f"Step {step}/{total}: training loss={m['train_loss']:.4f}"
                if valid_row is not None:
                    last_valid = step
                    data.update(valid_loss=valid_row["valid_loss"],
                                valid_mean_token_accuracy=valid_row.get("valid_token_acc"),
                                full_valid_loss=valid_row["valid_loss"],
                                full_valid_mean_token_accuracy=valid_row.get("valid_token_acc"))
                    msg += f", validation loss={valid_row['valid_loss']:.4f}"
                events.append(Event(msg, type="metrics", data=data))
            elif valid_row is not None and step > last_valid:  # a repeated step whose validation is new
                last_valid = step
                events.append(_valid_event(valid_row, step, total))
        elif "valid_loss" in m and step > last_valid:
            last_valid = step
            events.append(_valid_event(m, step, total))
        offset = end
        i += 1
    return events, Cursor(offset, last_train, last_valid)


def _valid_event(m: dict[str, Any], step: int, total: int) -> Event:
    data = {"step": step, "total_steps": total, "valid_loss": m["valid_loss"],
            "valid_mean_token_accuracy": m.get("valid_token_acc")}
    return Event(f"Step {step}/{total}: validation loss={m['valid_loss']:.4f}", type="metrics", data=data)


def checkpoint_metrics(by_step: dict[int, dict[str, Any]], step: int) -> dict[str, Any]:
    """A checkpoint's `metrics` object (OpenAI's fields) from the metrics events of its step."""
    keys = ("train_loss", "train_mean_token_accuracy", "valid_loss", "valid_mean_token_accuracy",
            "full_valid_loss", "full_valid_mean_token_accuracy")
    m = by_step.get(step, {})
    return {"step": float(step), **{k: m.get(k) for k in keys}}


def result_csv(metrics_path: Path) -> bytes:
    """OpenAI's result file columns: step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy."""
    rows: dict[int, dict[str, Any]] = {}
    if metrics_path.exists():
        for line in metrics_path.read_text(encoding="utf-8").splitlines():
            try:
                m = json.loads(line)
            except json.JSONDecodeError:
                continue
            step = int(m.get("step", 0))
            if m.get("baseline") or step == 0 or "warning" in m:
                continue
            r = rows.setdefault(step, {})  # a resumed run repeats steps: the later line wins
            if "train_loss" in m:
                r.update(train_loss=m["train_loss"], train_accuracy=m.get("train_token_acc"))
            if "valid_loss" in m:
                r.update(valid_loss=m["valid_loss"], valid_mean_token_accuracy=m.get("valid_token_acc"))
    out = io.StringIO()
    cols = ["step", "train_loss", "train_accuracy", "valid_loss", "valid_mean_token_accuracy"]
    w = csv.writer(out)
    w.writerow(cols)
    for step in sorted(rows):
        w.writerow([step, *(_fmt(rows[step].get(c)) for c in cols[1:])])
    return out.getvalue().encode()


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)
