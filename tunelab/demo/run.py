"""`make demo` / `tunelab demo`: the main job, end to end.

1. Fine-tune SmolLM2-135M-Instruct with LoRA on the bundled clinical-note -> JSON task
   (the bundled tunelab/resources/configs/demo_clinical_lora.yaml, found through importlib.resources so an
   installed wheel runs it from any directory; resumes an interrupted demo run instead of starting over).
2. On the held-out test split (templates and vocabulary training never saw), compare the base model
   *prompted with format instructions* against the fine-tuned model *without* them: JSON validity,
   schema conformance, field accuracy. Greedy decoding, fixed settings, recorded with the results.
   Forgetting: both also answer questions from the bundled general set. This is `tunelab eval`'s pipeline.
3. Write RUN/eval/results.json and the self-contained HTML report (loss curves with baseline and best step,
   metric table, forgetting, side-by-side samples) into the run folder, and print its path.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rich.markup import escape

from tunelab.config import RunConfig, load_config
from tunelab.demo.clinical import FIELDS, FORMAT_INSTRUCTIONS, JSON_SCHEMA
from tunelab.eval.run import write_json
from tunelab.rundir import RunDir

GENERAL_QUESTIONS = 60
SAMPLES = 3
METRICS = (("json_valid", "valid JSON"), ("schema", "schema conformance"), ("field_accuracy", "field accuracy"))


def demo_config(out: Path, steps: int | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The shipped demo config (inside the package) with the run folder, step count and any `KEY=VALUE`
    overrides applied."""
    from tunelab.resources import config_path

    sets = [f"output_dir={out}", *overrides]
    if steps is not None:
        sets.append(f"train.max_steps={steps}")
    return load_config(config_path("demo"), sets)


def _train(cfg: RunConfig, console: Any) -> Path:
    from tunelab.train.run import train

    rd = RunDir(cfg.output_dir)
    out = rd.path
    finished = rd.is_finished()
    resume = out.exists() and not finished and bool(rd.checkpoints())
    if resume:
        console.print(f"resuming the interrupted demo run in {out}")
    elif finished:
        # A finished demo is somebody's results (and report): keep it beside the new one, never delete it.
        kept = out.with_name(f"{out.name}.{time.strftime('%Y%m%d-%H%M%S', time.localtime(out.stat().st_mtime))}")
        out.rename(kept)
        console.print(f"the previous demo run is kept in {kept}")
    res = train(cfg, resume=resume, overwrite=not resume, console=console)
    return res.run_dir


def compare(run_dir: Path, limit: int | None, console: Any, general: int = GENERAL_QUESTIONS, batch_size: int = 12,
            max_new_tokens: int = 160, data: Path | None = None, general_data: Path | None = None,
            baseline: dict[str, Any] | None = None) -> dict[str, Any]:
    """Base (with instructions) vs fine-tuned (without) on the run's test split (or `data`), through `tunelab
    eval`'s own pipeline (one base model in memory, the adapter attached by name): the task metrics, reference
    loss, and forgetting on `general` questions of the bundled general eval set (or `general_data`). `baseline`:
    earlier results whose base entry is reused when it was scored identically. Returns the results `tunelab
    report` reads."""
    from tunelab.eval.config import EvalConfig, GenerationSettings
    from tunelab.eval.run import evaluate, plan

    p = plan(run_dir, data=data, system_prompt=FORMAT_INSTRUCTIONS)
    p.eval_config = EvalConfig(
        metrics=["json_valid", "schema", "field_accuracy", "exact_match", "rouge_l"], json_schema=JSON_SCHEMA,
        fields=list(FIELDS), max_examples=limit, general_max_examples=general,
        general_data=str(general_data) if general_data else None,
        generation=GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size),
    )
    return evaluate(p, log=lambda line: console.print(f"[dim]{escape(line)}[/dim]"), baseline=baseline)


def print_table(res: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    base, tuned = res["targets"][0], res["targets"][1]
    t = Table(title=f"Clinical note -> JSON, held-out test split ({res['n_examples']} examples, greedy)")
    t.add_column("metric")
    t.add_column("base + format instructions", justify="right")
    t.add_column("fine-tuned, no instructions", justify="right")
    for key, label in METRICS:
        b, f = base["metrics"][key] or 0.0, tuned["metrics"][key] or 0.0
        t.add_row(label, f"{100 * b:.1f}%", f"[bold]{100 * f:.1f}%[/bold]")
    if "general" in base:
        n = base["general"]["n"]
        t.add_row(f"general questions ({n})", f"{100 * base['general']['accuracy']:.1f}%",
                  f"{100 * tuned['general']['accuracy']:.1f}%")
    console.print(t)
    # The first few test notes, whatever their scores: samples chosen without looking at the outputs.
    for ex in res["examples"][:SAMPLES]:
        note = ex["prompt"][-1]["content"]
        ok = "valid" if ex["scores"][tuned["name"]].get("schema") else "NOT schema-valid"
        console.print(f"[dim]test note {ex['index'] + 1}:[/dim] {escape(note)}")
        console.print(f"[dim]  reference:[/dim]  {escape(ex['reference'])}")
        console.print(f"[dim]  fine-tuned ({ok}):[/dim] {escape(ex['outputs'][tuned['name']][:400])}")
        console.print(f"[dim]  base:[/dim] {escape(ex['outputs'][base['name']][:200])}")


def run_demo(out: Path, steps: int | None = None, limit: int | None = None, console: Any = None) -> dict[str, Any]:
    from rich.console import Console

    console = console or Console()
    cfg = demo_config(out, steps)
    console.rule("1. fine-tune SmolLM2-135M-Instruct with LoRA")
    run_dir = _train(cfg, console)
    console.rule("2. before / after on the held-out test split")
    assert cfg.data.test is not None
    res = compare(run_dir, limit, console)
    results = RunDir(run_dir).results_path
    write_json(results, res)
    print_table(res, console)
    console.print(f"results: {results}")
    from tunelab.eval.report import write_report

    console.print(f"report: {write_report(run_dir)}")
    return res
