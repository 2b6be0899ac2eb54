"""Evaluation subcommands: `tunelab eval`, `tunelab judge` (LLM or --human) and `tunelab report`.
Thin functions: parse arguments, call tunelab.eval, print."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def eval_cmd(
    config_or_run: Annotated[str, typer.Argument(help="a run folder, or a run config YAML (evaluates its base model)")],
    data: Annotated[Path | None, typer.Option("--data", help="held-out JSONL (default: data.test of the config)")] = None,
    run: Annotated[list[Path] | None, typer.Option("--run", help="another fine-tuned run folder to compare (repeatable)")] = None,
    system_prompt: Annotated[str | None, typer.Option("--system-prompt", help="system prompt for the base model only")] = None,
    eval_config: Annotated[Path | None, typer.Option("--eval-config", help="YAML with the eval: settings")] = None,
    max_examples: Annotated[int | None, typer.Option(help="evaluate only the first N examples")] = None,
    forgetting: Annotated[bool | None, typer.Option("--forgetting/--no-forgetting", help="score the general set")] = None,
    out: Annotated[Path | None, typer.Option(help="results JSON (default: RUN/eval/results.json)")] = None,
    baseline: Annotated[Path | None, typer.Option("--baseline", help="earlier results whose base-model scores to reuse when the settings match")] = None,
) -> None:
    """Score the base model and fine-tuned runs on the same held-out examples; write results JSON and a table."""
    from tunelab.eval.run import evaluate, plan, read_results, results_table, write_json

    p = plan(config_or_run, data=data, runs=run or [], system_prompt=system_prompt, eval_config=eval_config, out=out)
    updates: dict[str, object] = {}
    if max_examples is not None:
        updates["max_examples"] = max_examples
    if forgetting is not None:
        updates["forgetting"] = forgetting
    if updates:
        p.eval_config = p.eval_config.model_copy(update=updates)
    prev = read_results(baseline) if baseline else None
    res = evaluate(p, log=lambda s: err_console.print(s, style="dim", markup=False), baseline=prev)
    for path in p.outputs:
        write_json(path, res)
    console.print(results_table(res))
    for path in p.outputs:
        console.print(f"results: {path}")


def judge_cmd(
    results: Annotated[Path, typer.Argument(help="a run folder (its eval/results.json) or a results JSON")],
    human: Annotated[bool, typer.Option("--human", help="judge yourself on the terminal (resumable)")] = False,
    x: Annotated[str | None, typer.Option("--x", help="candidate model name (default: first fine-tuned run)")] = None,
    y: Annotated[str | None, typer.Option("--y", help="model compared against (default: base)")] = None,
    base_url: Annotated[str | None, typer.Option(help="OpenAI-compatible endpoint (overrides eval.judge.base_url)")] = None,
    model: Annotated[str | None, typer.Option(help="judge model name (overrides eval.judge.model)")] = None,
    eval_config: Annotated[Path | None, typer.Option("--eval-config", help="YAML with eval.judge settings")] = None,
    out: Annotated[Path | None, typer.Option(help="output (default: eval/judge.json or eval/human.jsonl next to the results)")] = None,
) -> None:
    """Blind pairwise comparison: win/tie/loss, win rate with a 95% CI, and position bias."""
    from tunelab.eval.config import eval_config_from_dict, load_eval_config
    from tunelab.eval.judge import Judge, human_judge, judge_pairs, pairs_from_results
    from tunelab.eval.run import read_results, write_json

    res = read_results(results)
    pairs, xn, yn = pairs_from_results(res, x, y)
    ev = load_eval_config(eval_config) if eval_config else eval_config_from_dict(res.get("eval_config"))
    settings = ev.judge.model_copy(update={k: v for k, v in {"base_url": base_url, "model": model}.items() if v})
    eval_dir = (results / "eval") if results.is_dir() else results.parent
    if human:
        path = out or eval_dir / "human.jsonl"
        console.print(f"judging {len(pairs)} pairs blind ({xn} vs {yn}, shown as A/B in random order); "
                      f"choices go to {path}; q quits, re-run to resume")
        s = human_judge(pairs, path, x_name=xn, y_name=yn, seed=settings.seed, show=lambda t: console.print(t, markup=False))
    else:
        j = Judge(settings)
        with console.status(f"judging {len(pairs)} pairs with {settings.model}"):
            data = judge_pairs(pairs, j)
        data.update({"x": xn, "y": yn, "judge_model": settings.model, "judge_base_url": settings.base_url,
                     "settings": settings.model_dump()})
        path = out or eval_dir / "judge.json"
        write_json(path, data)
        s = data["summary"]
    _print_summary(xn, yn, s)
    console.print(f"judgements: {path}")


def _print_summary(xn: str, yn: str, s: dict[str, object]) -> None:
    from rich.table import Table

    from tunelab.eval.run import fmt

    t = Table(title=f"blind win rate: {xn} vs {yn}")
    for c in ("n", "wins", "ties", "losses", "win rate", "95% CI", "swap agreement", "position A rate", "bias?"):
        t.add_column(c, justify="right")
    ci = s.get("ci95") or [None, None]
    assert isinstance(ci, list)
    t.add_row(
        str(s.get("n")), str(s.get("wins")), str(s.get("ties")), str(s.get("losses")), fmt(s.get("win_rate")),
        f"[{fmt(ci[0])}, {fmt(ci[1])}]", fmt(s.get("swap_agreement")), fmt(s.get("position_a_rate")),
        "yes" if s.get("position_bias_detected") else "no",
    )
    console.print(t)


def report_cmd(
    run: Annotated[Path, typer.Argument(help="run folder")],
    out: Annotated[Path | None, typer.Option(help="HTML file (default: RUN/report.html)")] = None,
) -> None:
    """Write one self-contained HTML report: loss curves, metrics vs base, win rate, forgetting, samples."""
    from tunelab.eval.report import write_report

    path = write_report(run, out)
    console.print(f"report: {path}")


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)
    app.command("judge")(judge_cmd)
    app.command("report")(report_cmd)
