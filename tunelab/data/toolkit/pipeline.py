"""The `data.pipeline` YAML section: an input file, an ordered list of steps (dedup, scrub, filter,
contamination), and where the result, the per-step rejects and the reports go.

    data:
      pipeline:
        input: raw/support.jsonl
        output: data/train.jsonl
        work_dir: runs/data-prep          # NN-<step>.jsonl, NN-<step>.rejects.jsonl, report.json
        steps:
          - dedup: {threshold: 0.85, roles: [user]}
          - scrub: {}
          - filter: {min_tokens: 8, max_repetition: 0.4, languages: [en]}
          - contamination: {eval: data/test.jsonl}

Each step's output is the next step's input; rows in = rows out + rows rejected holds for every step and for
the whole chain. Paths are relative to the YAML file's folder.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from tunelab.data.toolkit.contamination import ContaminationConfig, contamination
from tunelab.data.toolkit.dedup import DedupConfig, dedup
from tunelab.data.toolkit.filter import FilterConfig, quality_filter
from tunelab.data.toolkit.io import StepReport, console
from tunelab.data.toolkit.scrub import ScrubConfig, scrub
from tunelab.errors import ConfigError, read_yaml


class ContaminationStep(ContaminationConfig):
    eval: str
    """The evaluation file whose examples must not appear in training."""


STEP_MODELS: dict[str, type[BaseModel]] = {
    "dedup": DedupConfig,
    "scrub": ScrubConfig,
    "filter": FilterConfig,
    "contamination": ContaminationStep,
}


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    output: str
    work_dir: str = "runs/data-pipeline"
    steps: list[dict[str, Any]]

    @field_validator("steps")
    @classmethod
    def _steps(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not v:
            raise ValueError("at least one step is needed")
        out = []
        for i, s in enumerate(v):
            if not isinstance(s, dict) or len(s) != 1:
                raise ValueError(f"steps[{i}]: each step is a one-key mapping like '- dedup: {{...}}'")
            (name, opts), = s.items()
            if name not in STEP_MODELS:
                raise ValueError(f"steps[{i}]: unknown step {name!r} (known: {', '.join(STEP_MODELS)})")
            try:
                out.append({name: STEP_MODELS[name].model_validate(opts or {})})
            except ValidationError as e:
                detail = "; ".join(f"{'.'.join(str(x) for x in er['loc'])}: {er['msg']}" for er in e.errors())
                raise ValueError(f"steps[{i}].{name}: {detail}") from None
        return out


def load_pipeline(path: str | Path) -> tuple[PipelineConfig, Path]:
    """Read `data.pipeline` (or a top-level `pipeline`) from a YAML file."""
    p = Path(path)
    raw = read_yaml(p)
    section = None
    if isinstance(raw, dict):
        data = raw.get("data")
        section = data.get("pipeline") if isinstance(data, dict) else None
        section = section if section is not None else raw.get("pipeline")
    if not isinstance(section, dict):
        raise ConfigError(f"{p}: no 'data.pipeline' section (a mapping with input, output and steps)")
    try:
        return PipelineConfig.model_validate(section), p.parent
    except ValidationError as e:
        lines = [f"  data.pipeline.{'.'.join(str(x) for x in er['loc'])}: {er['msg']}" for er in e.errors()]
        raise ConfigError(f"{p}: invalid data.pipeline section\n" + "\n".join(lines)) from None


def run_pipeline(cfg: PipelineConfig, base: str | Path = ".") -> dict[str, Any]:
    """Run the steps in order; returns {"steps": [report...], "rows_in", "rows_out", "rows_rejected"}."""
    root = Path(base)

    def rel(x: str) -> Path:
        q = Path(x)
        return q if q.is_absolute() else root / q

    work = rel(cfg.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    current = rel(cfg.input)
    reports: list[StepReport] = []
    t0 = time.perf_counter()
    for n, step in enumerate(cfg.steps, start=1):
        (name, opts), = step.items()
        out = work / f"{n:02d}-{name}.jsonl"
        rej = work / f"{n:02d}-{name}.rejects.jsonl"
        console.print(f"[bold]step {n}/{len(cfg.steps)}: {name}[/bold]")
        if name == "dedup":
            rep = dedup(current, out, opts, rej)
        elif name == "scrub":
            rep = scrub(current, out, opts, rej)
        elif name == "filter":
            rep = quality_filter(current, out, opts, rej)
        else:
            c = ContaminationConfig.model_validate(opts.model_dump(exclude={"eval"}))
            _, srep = contamination(current, rel(opts.eval), c, output=out, rejects=rej)
            assert srep is not None
            rep = srep
        reports.append(rep)
        current = out
    final = rel(cfg.output)
    final.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(current, final)
    summary: dict[str, Any] = {
        "input": str(rel(cfg.input)),
        "output": str(final),
        "rows_in": reports[0].rows_in,
        "rows_out": reports[-1].rows_out,
        "rows_rejected": sum(r.rows_rejected for r in reports),
        "seconds": round(time.perf_counter() - t0, 3),
        "steps": [r.to_json() for r in reports],
    }
    if summary["rows_in"] != summary["rows_out"] + summary["rows_rejected"]:
        raise AssertionError("pipeline lost rows: rows in != rows out + rows rejected")
    (work / "report.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
