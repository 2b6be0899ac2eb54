"""Benchmark: one configuration of the demo recipe, scored on the VALIDATION split, as one table row.

Trains the demo config (the shipped YAML of `make demo`) with `--set` overrides, then scores the fine-tuned model
-- without instructions, as in the demo -- on the clinical validation split (its own templates and vocabulary,
never the test split) and on the general validation questions (forgetting; disjoint from the general train
data that `data.mix` draws on and from the general eval set the demo reports). The base model's scores are
computed once per work folder and reused. Each row is appended to WORK/sweep.jsonl and the whole table printed,
so a sweep is a series of commands:

    OMP_NUM_THREADS=2 .venv/bin/python bench/demo_sweep.py --name default
    OMP_NUM_THREADS=2 .venv/bin/python bench/demo_sweep.py --name nomix --set data.mix=null
    OMP_NUM_THREADS=2 .venv/bin/python bench/demo_sweep.py --name r32 --set lora.r=32 --set lora.alpha=64
    OMP_NUM_THREADS=2 .venv/bin/python bench/demo_sweep.py --name no-eot --no-eot-loss
    OMP_NUM_THREADS=2 .venv/bin/python bench/demo_sweep.py --table            # print the table only

Training time depends on machine load (the rows record the load average); the scores do not. To keep rows
cheap, the sweep skips the base model's step-0 validation and validates once, at the end (the demo also
validates at steps 10 and 20), so train_s is a little under the demo's training time. `--report` scores the
test split and the general eval set instead: for reporting a chosen recipe (e.g. with and without mixing),
never for choosing one.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COLUMNS = ("name", "overrides", "steps", "train_s", "load", "val_loss", "json_valid", "schema", "field_accuracy",
           "general", "general_delta")


def _no_eot_loss() -> None:
    """Train without loss on the end-of-turn token (the ablation): trim each trained span before it."""
    from tunelab.data import templates

    if not hasattr(templates, "_end_of_turn"):
        raise SystemExit("--no-eot-loss: tunelab.data.templates no longer has _end_of_turn; update this script")

    def before_eos(tok: Any, text: str, start: int, end: int) -> int:
        k = text.rfind(tok.eos_token, start, end) if tok.eos_token else -1
        return k if k >= 0 else end

    templates._end_of_turn = before_eos  # type: ignore[attr-defined]


def general_validation() -> Path:
    from tunelab.eval.general import GENERAL_DIR

    return GENERAL_DIR / "validation.jsonl"


def run_one(a: argparse.Namespace, work: Path) -> dict[str, Any]:
    from rich.console import Console

    from tunelab.demo.clinical import bundled_path
    from tunelab.demo.run import compare, demo_config
    from tunelab.eval.run import write_json
    from tunelab.train.run import train

    if a.no_eot_loss:
        _no_eot_loss()
    cfg = demo_config(work / a.name, None, ["eval.baseline=false", "train.eval_every=100000", *a.set])
    console = Console(stderr=True)
    run_dir = Path(cfg.output_dir)
    load0 = os.getloadavg()[0]
    if a.skip_train and (run_dir / "adapter").is_dir():  # score an earlier row's finished run again
        rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_s = max(r.get("elapsed_s", 0.0) for r in rows)  # the training loop's own clock
    else:
        t0 = time.time()
        run_dir = train(cfg, overwrite=True, console=console, show_progress=False).run_dir
        train_s = time.time() - t0
    load = (load0 + os.getloadavg()[0]) / 2
    split = "test" if a.report else "validation"
    base_file = work / f"base-{split}.json"
    prev = json.loads(base_file.read_text()) if base_file.is_file() else None
    out = compare(run_dir, None, console, general=a.general, data=bundled_path(split),
                  general_data=None if a.report else general_validation(), baseline=prev)
    write_json(run_dir / "eval" / f"{split}-results.json", out)
    if prev is None:
        write_json(base_file, out)
    base, tuned = out["targets"][0], out["targets"][1]
    losses = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["valid_loss"] for r in losses if "valid_loss" in r]
    row = {
        "name": a.name + (" (no eot loss)" if a.no_eot_loss else "") + (" [TEST split]" if a.report else ""),
        "overrides": " ".join(a.set) + (" --no-eot-loss" if a.no_eot_loss else ""),
        "steps": cfg.train.max_steps, "train_s": round(train_s), "load": round(load, 1),
        "val_loss": round(val[-1], 3) if val else None,
        **{k: tuned["metrics"][k] for k in ("json_valid", "schema", "field_accuracy")},
        "general": tuned["general"]["accuracy"], "general_delta": tuned["general"]["accuracy"] - base["general"]["accuracy"],
        "base": {k: base["metrics"][k] for k in ("json_valid", "schema", "field_accuracy")}
                | {"general": base["general"]["accuracy"]},
    }
    with open(work / _rows_file(a.report), "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _rows_file(report: bool) -> str:
    return "report.jsonl" if report else "sweep.jsonl"


def print_table(work: Path, report: bool = False) -> None:
    from rich.console import Console
    from rich.table import Table

    path = work / _rows_file(report)
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.is_file() else []
    split = "TEST split, general eval set" if report else "validation split, general validation set"
    t = Table(title=f"demo recipe on the {split} ({path}); train_s as measured (see load)")
    for c in COLUMNS:
        t.add_column(c, justify="left" if c in ("name", "overrides") else "right")
    if rows:
        b = rows[-1]["base"]
        t.add_row("base + format instructions", "", "", "", "", "", *(f"{100 * b[k]:.1f}%" for k in ("json_valid", "schema", "field_accuracy")),
                  f"{100 * b['general']:.1f}%", "")
    for r in rows:
        pct = [f"{100 * r[k]:.1f}%" if r[k] is not None else "n/a" for k in ("json_valid", "schema", "field_accuracy", "general")]
        t.add_row(r["name"], r["overrides"], str(r["steps"]), str(r["train_s"]), str(r["load"]), str(r["val_loss"]),
                  *pct, f"{100 * r['general_delta']:+.1f}")
    Console(width=200).print(t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", help="row name (and run folder under --work)")
    ap.add_argument("--set", action="append", default=[], help="config override KEY=VALUE (repeatable)")
    ap.add_argument("--no-eot-loss", action="store_true", help="no loss on the end-of-turn token (ablation)")
    ap.add_argument("--general", type=int, default=60, help="general validation questions")
    ap.add_argument("--work", default="runs/sweep")
    ap.add_argument("--table", action="store_true", help="only print the table so far")
    ap.add_argument("--skip-train", action="store_true", help="reuse the finished run of the same --name")
    ap.add_argument("--report", action="store_true",
                    help="score the test split and general eval set (to report a chosen recipe, not to choose)")
    a = ap.parse_args()
    work = ROOT / a.work
    work.mkdir(parents=True, exist_ok=True)
    if not a.table:
        if not a.name:
            ap.error("--name is required to run a configuration")
        run_one(a, work)
    print_table(work, a.report)


if __name__ == "__main__":
    sys.exit(main())
