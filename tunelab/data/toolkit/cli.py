"""`tunelab data dedup|scrub|filter|synth|contamination|stats|pipeline`: parse options, call the toolkit
function, print its report. No logic here. Reports carry counts only, never the PII that scrub found."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer
from pydantic import BaseModel, ValidationError
from rich.console import Console
from rich.table import Table

from tunelab.data.toolkit.io import StepReport
from tunelab.errors import ConfigError, TunelabError

out = Console()


def _cfg(cls: type[BaseModel], **kw: Any) -> Any:
    try:
        return cls(**{k: v for k, v in kw.items() if v is not None})
    except ValidationError as e:
        raise ConfigError("; ".join(f"--{'-'.join(str(x) for x in er['loc'])}: {er['msg']}" for er in e.errors())) from None


def _csv(v: str | None) -> list[str] | None:
    return [x.strip() for x in v.split(",") if x.strip()] if v else None


def _show(rep: StepReport, report: Path | None) -> None:
    t = Table(title=f"{rep.step}: {rep.input}", show_header=False)
    t.add_row("rows in", f"{rep.rows_in:,}")
    t.add_row("rows out", f"{rep.rows_out:,}")
    t.add_row("rows rejected", f"{rep.rows_rejected:,}")
    if rep.rows_changed:
        t.add_row("rows changed", f"{rep.rows_changed:,}")
    for k, v in sorted(rep.reasons.items()):
        t.add_row(f"  {k}", f"{v:,}")
    t.add_row("output", str(rep.output))
    t.add_row("rejects/audit", str(rep.rejects))
    t.add_row("seconds", f"{rep.seconds:.1f}")
    out.print(t)
    for k in ("pii_counts", "clusters", "errors", "api_calls", "cache_hits", "ppl_threshold", "summary"):
        if k in rep.details:
            out.print(f"{k}: {json.dumps(rep.details[k])}")
    if report is not None:
        rep.write(report)
        out.print(f"report: {report}")


def dedup_cmd(
    input: Path = typer.Argument(..., help="Data file (JSONL in any supported format, or .parquet/.csv)."),
    output: Path = typer.Option(..., "-o", "--output", help="Kept rows (JSONL)."),
    rejects: Path | None = typer.Option(None, help="Dropped rows with reasons [default: OUTPUT.rejects.jsonl]."),
    report: Path | None = typer.Option(None, help="Write the report (with clusters) as JSON here."),
    threshold: float | None = typer.Option(None, help="Jaccard threshold for near-duplicates [0.8]."),
    num_perm: int | None = typer.Option(None, help="MinHash permutations [128]."),
    shingle_size: int | None = typer.Option(None, help="Words per shingle [3]."),
    roles: str | None = typer.Option(None, help="Compare only these roles, e.g. user or user,assistant."),
    exact: bool = typer.Option(True, "--exact/--no-exact"),
    near: bool = typer.Option(True, "--near/--no-near"),
    index: str | None = typer.Option(None, help="bands (fast, in memory) or lsh (datasketch MinHashLSH)."),
    redis_url: str | None = typer.Option(None, help="Persistent LSH in Redis, e.g. redis://localhost:6379/0."),
    redis_basename: str | None = typer.Option(None, help="Name of the persistent index [tunelab-dedup]."),
    num_proc: int | None = typer.Option(None, help="Worker processes [auto]."),
) -> None:
    """Remove exact and near-duplicate examples (MinHash LSH)."""
    from tunelab.data.toolkit.dedup import DedupConfig, dedup

    cfg = _cfg(DedupConfig, threshold=threshold, num_perm=num_perm, shingle_size=shingle_size, roles=_csv(roles),
               exact=exact, near=near, index=index, redis_url=redis_url, redis_basename=redis_basename,
               num_proc=num_proc)
    _show(dedup(input, output, cfg, rejects), report)


def scrub_cmd(
    input: Path = typer.Argument(...),
    output: Path = typer.Option(..., "-o", "--output"),
    rejects: Path | None = typer.Option(None, help="Audit of changed rows [default: OUTPUT.rejects.jsonl]."),
    report: Path | None = typer.Option(None),
    engine: str | None = typer.Option(None, help="regex (built in) or presidio (if installed)."),
    types: str | None = typer.Option(None, help="Comma list of PII types [all]."),
    num_proc: int | None = typer.Option(None),
) -> None:
    """Replace PII with typed placeholders (<EMAIL>, <PHONE>, ...)."""
    from tunelab.data.toolkit.scrub import ScrubConfig, scrub

    cfg = _cfg(ScrubConfig, engine=engine, types=_csv(types.upper() if types else None), num_proc=num_proc)
    _show(scrub(input, output, cfg, rejects), report)


def filter_cmd(
    input: Path = typer.Argument(...),
    output: Path = typer.Option(..., "-o", "--output"),
    rejects: Path | None = typer.Option(None),
    report: Path | None = typer.Option(None),
    min_tokens: int | None = typer.Option(None),
    max_tokens: int | None = typer.Option(None),
    max_repetition: float | None = typer.Option(None, help="Max fraction of repeated word 3-grams."),
    languages: str | None = typer.Option(None, "--lang", help="Languages to keep, e.g. en or en,de."),
    ppl_drop: float | None = typer.Option(None, help="Drop this fraction with the highest perplexity."),
    ppl_model: str | None = typer.Option(None, help="Reference model [the base model]."),
    tokenizer: str | None = typer.Option(None, help="Tokenizer for token counts, or 'words' [base model]."),
    scores: bool = typer.Option(True, "--scores/--no-scores", help="Write scores under metadata.quality."),
    num_proc: int | None = typer.Option(None),
) -> None:
    """Drop rows by token length, repetition, language and perplexity; keep the scores."""
    from tunelab.data.toolkit.filter import FilterConfig, quality_filter

    cfg = _cfg(FilterConfig, min_tokens=min_tokens, max_tokens=max_tokens, max_repetition=max_repetition,
               languages=_csv(languages), ppl_drop_fraction=ppl_drop, ppl_model=ppl_model, tokenizer=tokenizer,
               keep_scores=scores, num_proc=num_proc)
    _show(quality_filter(input, output, cfg, rejects), report)


def synth_cmd(
    output: Path = typer.Option(..., "-o", "--output"),
    topic: list[str] | None = typer.Option(None, "--topic", help="A seed topic (repeatable)."),
    topics: Path | None = typer.Option(None, help="File of seed topics, one per line."),
    seed_examples: Path | None = typer.Option(None, help="JSONL of example conversations to imitate."),
    base_url: str | None = typer.Option(None, help="OpenAI-compatible endpoint [https://api.openai.com/v1]."),
    model: str | None = typer.Option(None, help="Generator model [gpt-4o-mini]."),
    api_key_env: str | None = typer.Option(None, help="Env variable holding the key [OPENAI_API_KEY]."),
    per_topic: int | None = typer.Option(None, help="Examples per topic [1]."),
    concurrency: int | None = typer.Option(None),
    retries: int | None = typer.Option(None),
    timeout: float | None = typer.Option(None),
    judge: bool = typer.Option(False, "--judge", help="Score each example with the judge and drop weak ones."),
    judge_model: str | None = typer.Option(None),
    min_score: int | None = typer.Option(None, help="Judge score (1-10) to keep [7]."),
    cache_dir: str | None = typer.Option(None, help="Response cache [.tunelab-synth-cache]."),
    dedup: bool = typer.Option(True, "--dedup/--no-dedup"),
    rejects: Path | None = typer.Option(None),
    report: Path | None = typer.Option(None),
) -> None:
    """Generate chat examples with a stronger model behind an OpenAI-compatible API."""
    from tunelab.data.readers import read_conversations
    from tunelab.data.toolkit.synth import SynthConfig, synth

    names = list(topic or [])
    if topics is not None:
        if not topics.exists():
            raise TunelabError(f"{topics}: file not found")
        names += [t.strip() for t in topics.read_text(encoding="utf-8").splitlines() if t.strip()]
    seeds = [c.to_json() for c in read_conversations(seed_examples)] if seed_examples else []
    cfg = _cfg(SynthConfig, base_url=base_url, model=model, api_key_env=api_key_env, per_topic=per_topic,
               concurrency=concurrency, max_retries=retries, timeout=timeout, judge=judge, judge_model=judge_model,
               min_score=min_score, cache_dir=cache_dir, dedup=dedup)
    rep = synth(output, names, seeds, cfg, rejects)
    _show(rep, report)
    if rep.rows_in and not rep.rows_out:  # scripts must notice that nothing came back
        raise TunelabError(f"synth: no example was generated; reasons are in {rep.rejects}")


def contamination_cmd(
    train: Path = typer.Argument(..., help="Training data."),
    eval: Path = typer.Argument(..., help="Evaluation (validation/test) data."),
    output: Path | None = typer.Option(None, "-o", "--output", help="Write training data minus leaked rows."),
    rejects: Path | None = typer.Option(None),
    report: Path | None = typer.Option(None, help="Write the full leak list as JSON."),
    ngram: int | None = typer.Option(None, help="Words per n-gram [8]."),
    min_overlap: float | None = typer.Option(None, help="Fraction of an eval example's n-grams [0.5]."),
    threshold: float | None = typer.Option(None, help="MinHash Jaccard threshold [0.8]."),
    show: int = typer.Option(20, help="Leaks to list."),
    num_proc: int | None = typer.Option(None),
) -> None:
    """Find evaluation examples that leak into training data (n-gram overlap + MinHash)."""
    from tunelab.data.toolkit.contamination import ContaminationConfig, contamination

    cfg = _cfg(ContaminationConfig, ngram=ngram, min_overlap=min_overlap, threshold=threshold, num_proc=num_proc)
    rep, step = contamination(train, eval, cfg, output, rejects)
    t = Table(title=f"contamination: {len(rep.leaked_eval)} of {rep.eval_rows} eval examples leaked")
    for col in ("eval line", "train line", "method", "score"):
        t.add_column(col)
    for lk in rep.leaks[:show]:
        t.add_row(str(lk.eval_line), str(lk.train_line), lk.method, f"{lk.score:.3f}")
    out.print(t)
    out.print(rep.summary())
    if step is not None:
        _show(step, None)
    if report is not None:
        report.parent.mkdir(parents=True, exist_ok=True)
        report.write_text(json.dumps(rep.to_json(), indent=2) + "\n", encoding="utf-8")
        out.print(f"report: {report}")


def stats_cmd(
    input: Path = typer.Argument(...),
    tokenizer: str | None = typer.Option(None, help="Count tokens with this model's tokenizer [words]."),
    histogram: Path | None = typer.Option(None, help="Write a PNG histogram of lengths here."),
    as_json: bool = typer.Option(False, "--json", help="Print the statistics as JSON."),
    num_proc: int | None = typer.Option(None),
) -> None:
    """Examples, tokens, turns, roles, lengths and duplicate rate of a data file."""
    from tunelab.data.toolkit.stats import dataset_stats

    tok = None
    if tokenizer and tokenizer != "words":
        from tunelab.model.loading import load_tokenizer, resolve_model

        tok = load_tokenizer(resolve_model(tokenizer))
    s = dataset_stats(input, tokenizer=tok, histogram=histogram, num_proc=num_proc)
    if as_json:
        out.print_json(json.dumps(s))
        return
    t = Table(title=f"stats: {input}", show_header=False)
    t.add_row("examples", f"{s['examples']:,}" + (f" ({s['unparseable']} unparseable)" if s["unparseable"] else ""))
    t.add_row(s["token_unit"], f"{s['tokens']['total']:,} (median {s['tokens'].get('p50', 0):.0f}, "
              f"p95 {s['tokens'].get('p95', 0):.0f}, max {s['tokens'].get('max', 0):.0f})")
    t.add_row("turns", f"{s['turns']['total']:,} (per example: {json.dumps(s['turns']['histogram'])})")
    t.add_row("roles", json.dumps(s["roles"]))
    t.add_row("duplicates", f"{s['duplicates']:,} ({100 * s['duplicate_rate']:.2f}%)")
    if "histogram" in s:
        t.add_row("histogram", s["histogram"])
    out.print(t)


def pipeline_cmd(config: Path = typer.Argument(..., help="YAML with a data.pipeline section.")) -> None:
    """Run the data.pipeline steps of a YAML config in order."""
    from tunelab.data.toolkit.pipeline import load_pipeline, run_pipeline

    cfg, base = load_pipeline(config)
    summary = run_pipeline(cfg, base)
    t = Table(title=f"pipeline: {summary['input']} -> {summary['output']}")
    for col in ("step", "in", "out", "rejected", "changed", "reasons"):
        t.add_column(col)
    for r in summary["steps"]:
        t.add_row(r["step"], f"{r['rows_in']:,}", f"{r['rows_out']:,}", f"{r['rows_rejected']:,}",
                  f"{r['rows_changed']:,}", json.dumps(r["reasons"]))
    out.print(t)


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    data_app.command("dedup")(dedup_cmd)
    data_app.command("scrub")(scrub_cmd)
    data_app.command("filter")(filter_cmd)
    data_app.command("synth")(synth_cmd)
    data_app.command("contamination")(contamination_cmd)
    data_app.command("stats")(stats_cmd)
    data_app.command("pipeline")(pipeline_cmd)
