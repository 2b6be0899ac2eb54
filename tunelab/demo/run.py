"""`make demo` / `tunelab demo`: the main job, end to end.

1. Fine-tune SmolLM2-135M-Instruct with LoRA on the bundled clinical-note -> JSON task
   (configs/demo_clinical_lora.yaml; resumes an interrupted demo run instead of starting over).
2. On the held-out test split (templates and vocabulary training never saw), compare the base model
   *prompted with format instructions* against the fine-tuned model *without* them: JSON validity,
   schema conformance, field accuracy. Greedy decoding, fixed settings, recorded with the results.
3. Write the results JSON and the self-contained HTML report (loss curves, baseline, best step) into the
   run folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig, load_config
from tunelab.data.readers import read_conversations
from tunelab.demo.clinical import FORMAT_INSTRUCTIONS
from tunelab.demo.scoring import aggregate, score_output
from tunelab.errors import TunelabError

DEMO_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_clinical_lora.yaml"
METRICS = (("json_valid", "valid JSON"), ("schema_ok", "schema conformance"), ("field_accuracy", "field accuracy"))


def demo_config(out: Path, steps: int | None) -> RunConfig:
    if not DEMO_CONFIG.exists():
        raise TunelabError(f"{DEMO_CONFIG} not found: run the demo from a tunelab checkout", 2)
    overrides = [f"output_dir={out}"]
    if steps is not None:
        overrides.append(f"train.max_steps={steps}")
    return load_config(DEMO_CONFIG, overrides)


def _train(cfg: RunConfig, console: Any) -> Path:
    from tunelab.train import checkpoint as ckpt
    from tunelab.train.run import train

    out = Path(cfg.output_dir)
    finished = (out / "adapter").exists() and (out / "state.json").exists()
    resume = out.exists() and not finished and bool(ckpt.list_checkpoints(out))
    if resume:
        console.print(f"resuming the interrupted demo run in {out}")
    res = train(cfg, resume=resume, overwrite=not resume, console=console)
    return res.run_dir


def compare(run_dir: Path, test_path: str, limit: int | None, console: Any, batch_size: int = 12,
            max_new_tokens: int = 160) -> dict[str, Any]:
    """Base (with instructions) vs fine-tuned (without) on the test split; one model in memory: the base is the
    fine-tuned model with its adapter disabled."""
    from tunelab.eval.config import GenerationSettings
    from tunelab.eval.generate import generate
    from tunelab.model.adapters import load_for_inference

    convs = read_conversations(test_path)[:limit]
    refs = [json.loads(c.completion) for c in convs]
    model, tok, _ = load_for_inference(str(run_dir))
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=batch_size)
    t0 = time.perf_counter()
    console.print(f"generating {len(convs)} test answers with the base model (format instructions in the prompt)...")
    with model.disable_adapter():
        base_out = generate(model, tok, convs, settings, system_prompt=FORMAT_INSTRUCTIONS)
    console.print(f"generating {len(convs)} test answers with the fine-tuned model (no instructions)...")
    tuned_out = generate(model, tok, convs, settings)
    base_scores = [score_output(o, r) for o, r in zip(base_out, refs, strict=True)]
    tuned_scores = [score_output(o, r) for o, r in zip(tuned_out, refs, strict=True)]
    return {
        "test_file": test_path,
        "examples": len(convs),
        "generation": {**settings.model_dump(), "decoding": "greedy"},
        "seconds": round(time.perf_counter() - t0, 1),
        "base_with_instructions": aggregate(base_scores),
        "finetuned_without_instructions": aggregate(tuned_scores),
        "samples": [
            {"note": c.prompt[-1].content, "reference": r, "base": b, "finetuned": f}
            for c, r, b, f in list(zip(convs, refs, base_out, tuned_out, strict=True))[:10]
        ],
    }


def print_table(res: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    t = Table(title=f"Clinical note -> JSON, held-out test split ({res['examples']} examples, greedy)")
    t.add_column("metric")
    t.add_column("base + format instructions", justify="right")
    t.add_column("fine-tuned, no instructions", justify="right")
    for key, label in METRICS:
        b, f = res["base_with_instructions"][key], res["finetuned_without_instructions"][key]
        t.add_row(label, f"{100 * b:.1f}%", f"[bold]{100 * f:.1f}%[/bold]")
    console.print(t)
    from rich.markup import escape

    s = res["samples"][0]
    for label, text in (("sample note", s["note"]), ("base", s["base"][:300]), ("fine-tuned", s["finetuned"][:300])):
        console.print(f"[dim]{label}:[/dim] {escape(text)}")


def run_demo(out: Path, steps: int | None = None, limit: int | None = None, console: Any = None) -> dict[str, Any]:
    from rich.console import Console

    console = console or Console()
    cfg = demo_config(out, steps)
    console.rule("1. fine-tune SmolLM2-135M-Instruct with LoRA")
    run_dir = _train(cfg, console)
    console.rule("2. before / after on the held-out test split")
    assert cfg.data.test is not None
    res = compare(run_dir, cfg.data.test, limit, console)
    (run_dir / "eval").mkdir(exist_ok=True)
    (run_dir / "eval" / "demo.json").write_text(json.dumps(res, indent=1))
    print_table(res, console)
    console.print(f"results: {run_dir / 'eval' / 'demo.json'}")
    from tunelab.eval.report import write_report

    console.print(f"report: {write_report(run_dir)}")
    return res
