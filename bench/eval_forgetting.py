"""Benchmark: the quality gate on the demo task with SmolLM2-135M-Instruct.

Trains two LoRA runs on the clinical-note -> JSON task (without and with 20% general data mixed in), then
evaluates on the held-out test split: the base model *with* the format instructions as a system prompt vs
each fine-tuned model *without* them -- JSON validity, schema conformance, field accuracy, loss -- and the
change on the general set (forgetting). Optionally judges fine-tuned vs base blind with an LLM judge
(--judge-url/--judge-model, any OpenAI-compatible endpoint). Prints a table; writes runs/bench-eval/.

    OMP_NUM_THREADS=2 .venv/bin/python bench/eval_forgetting.py [--steps 60] [--limit 60]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


def train_config(out: Path, mix: float | None, steps: int, lr: float) -> Path:
    from tunelab.demo.clinical import bundled_path
    from tunelab.eval.general import general_path

    cfg: dict[str, object] = {
        "model": {"name": "smollm2-135m-instruct"},
        "finetune": "lora",
        "lora": {"r": 16, "alpha": 32, "dropout": 0.05},
        "data": {"train": str(bundled_path("train")), "validation": str(bundled_path("validation")),
                 "test": str(bundled_path("test")), "max_seq_len": 512},
        "train": {"max_steps": steps, "batch_size": 8, "lr": lr, "eval_every": steps, "warmup_ratio": 0.1,
                  "eval_max_examples": 20, "save_every": steps, "log_every": 2},
        "output_dir": str(out),
    }
    if mix:
        cfg["data"]["mix"] = {"path": str(general_path("train")), "fraction": mix}  # type: ignore[index]
    p = out.parent / f"{out.name}.yaml"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--limit", type=int, default=None, help="evaluate on the first N test examples")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--work", default="runs/bench-eval")
    ap.add_argument("--skip-train", action="store_true")
    ap.add_argument("--general", type=int, default=30, help="general-set examples for forgetting")
    ap.add_argument("--baseline-only", action="store_true", help="score the base model now (before training)")
    ap.add_argument("--judge-url", default=None)
    ap.add_argument("--judge-model", default=None)
    a = ap.parse_args()

    from tunelab.demo.clinical import FIELDS, FORMAT_INSTRUCTIONS, JSON_SCHEMA
    from tunelab.eval.config import EvalConfig, GenerationSettings, JudgeSettings
    from tunelab.eval.run import evaluate, plan, results_table, write_json

    work = ROOT / a.work
    runs = {"nomix": None, "mix20": 0.2}
    timings: dict[str, float] = {}
    cfgs = {name: train_config(work / name, mix, a.steps, a.lr) for name, mix in runs.items()}
    for name, cfg in cfgs.items():
        if a.baseline_only:
            break
        if a.skip_train and (work / name / "adapter").is_dir():
            continue
        t0 = time.time()
        subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(cfg), "--overwrite"], check=True, cwd=ROOT)
        timings[f"train {name}"] = time.time() - t0

    run_dirs = [] if a.baseline_only else [work / "nomix", work / "mix20"]
    p = plan(cfgs["nomix"], runs=run_dirs, system_prompt=FORMAT_INSTRUCTIONS)
    p.eval_config = EvalConfig(
        metrics=["json_valid", "schema", "field_accuracy", "exact_match", "rouge_l"],
        json_schema=JSON_SCHEMA, fields=list(FIELDS), max_examples=a.limit, general_max_examples=a.general,
        generation=GenerationSettings(max_new_tokens=a.max_new_tokens, batch_size=8),
        judge=JudgeSettings(base_url=a.judge_url, model=a.judge_model),
    )
    base_file = work / "base-results.json"
    p.outputs = [base_file] if a.baseline_only else [work / name / "eval" / "results.json" for name in runs]
    t0 = time.time()
    prev = json.loads(base_file.read_text()) if base_file.is_file() and not a.baseline_only else None
    res = evaluate(p, log=lambda s: print(s, file=sys.stderr), baseline=prev)
    timings["evaluate"] = time.time() - t0
    for out in p.outputs:
        write_json(out, res)
    if a.baseline_only:
        print(json.dumps(res["targets"][0]["metrics"]), res["targets"][0].get("general", {}).get("accuracy"))
        return

    from rich.console import Console

    con = Console(width=140)
    con.print(results_table(res))
    if a.judge_url:
        from tunelab.eval.judge import Judge, judge_pairs, pairs_from_results

        for name in runs:
            pairs, x, y = pairs_from_results(res, x=name, y="base")
            j = judge_pairs(pairs, Judge(p.eval_config.judge))
            j.update({"x": x, "y": y, "judge_model": a.judge_model, "judge_base_url": a.judge_url})
            write_json(work / name / "eval" / "judge.json", j)
            con.print(f"judge {x} vs {y}: {json.dumps(j['summary'])}")
    from tunelab.eval.report import write_report

    for name in runs:
        con.print(f"report: {write_report(work / name)}")
    con.print({k: round(v, 1) for k, v in timings.items()})


if __name__ == "__main__":
    main()
