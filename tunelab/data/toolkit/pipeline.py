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
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from tunelab.data.toolkit.contamination import ContaminationConfig, contamination
from tunelab.data.toolkit.dedup import DedupConfig, dedup
from tunelab.data.toolkit.filter import FilterConfig, quality_filter
from tunelab.data.toolkit.io import StepReport, console
from tunelab.data.toolkit.scrub import ScrubConfig, scrub
from tunelab.errors import ConfigError, format_validation_error, read_yaml


class ContaminationStep(ContaminationConfig):
    eval: str
    """The evaluation file whose examples must not appear in training."""


class _Step(BaseModel):
    """One pipeline step, written `- NAME: {options}` (empty options may be left out: `- scrub:`)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _empty_options(cls, v: Any) -> Any:
        return {k: ({} if o is None else o) for k, o in v.items()} if isinstance(v, dict) else v

    @property
    def name(self) -> str:
        return next(iter(type(self).model_fields))


class DedupStep(_Step):
    dedup: DedupConfig


class ScrubStep(_Step):
    scrub: ScrubConfig


class FilterStep(_Step):
    filter: FilterConfig


class ContaminationCheckStep(_Step):
    contamination: ContaminationStep


STEPS: dict[str, type[_Step]] = {"dedup": DedupStep, "scrub": ScrubStep, "filter": FilterStep,
                                 "contamination": ContaminationCheckStep}


def _step_tag(v: Any) -> str | None:
    if isinstance(v, _Step):
        return v.name
    return next(iter(v)) if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in STEPS else None


Step = Annotated[
    Annotated[DedupStep, Tag("dedup")] | Annotated[ScrubStep, Tag("scrub")] | Annotated[FilterStep, Tag("filter")]
    | Annotated[ContaminationCheckStep, Tag("contamination")],
    Discriminator(_step_tag, custom_error_type="unknown_step",
                  custom_error_message=f"each step is a one-key mapping naming one of {', '.join(STEPS)}, "
                                       "like '- dedup: {...}'"),
]
"""A discriminated union: the step's one key picks its options model."""


class PipelineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    input: str
    output: str
    work_dir: str = "runs/data-pipeline"
    steps: list[Step] = Field(min_length=1)

    @field_validator("steps", mode="before")
    @classmethod
    def _known_steps(cls, v: Any) -> Any:
        for i, s in enumerate(v if isinstance(v, list) else []):
            if isinstance(s, dict) and len(s) == 1 and (name := next(iter(s))) not in STEPS:
                raise ValueError(f"steps[{i}]: unknown step {name!r} (known: {', '.join(STEPS)})")
        return v


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
        raise ConfigError(format_validation_error(e, str(p), PipelineConfig, "data.pipeline.",
                                                  "data.pipeline section")) from None


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
        out = work / f"{n:02d}-{step.name}.jsonl"
        rej = work / f"{n:02d}-{step.name}.rejects.jsonl"
        console.print(f"[bold]step {n}/{len(cfg.steps)}: {step.name}[/bold]")
        if isinstance(step, DedupStep):
            rep = dedup(current, out, step.dedup, rej)
        elif isinstance(step, ScrubStep):
            rep = scrub(current, out, step.scrub, rej)
        elif isinstance(step, FilterStep):
            rep = quality_filter(current, out, step.filter, rej)
        else:
            opts = step.contamination
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
