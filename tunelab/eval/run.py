"""`tunelab eval`: run the same held-out examples through the base model (optionally with a system prompt)
and one or more fine-tuned runs, score them, measure forgetting on the general set, and write one results
JSON (outputs, per-example scores, aggregates, the exact generation settings) plus a terminal table.

The base model is loaded once; each run's adapter is attached to it by name with PEFT and switched in turn,
so evaluating N runs costs one model load.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.config import RunConfig, config_from_dict
from tunelab.data.readers import read_conversations
from tunelab.data.records import Conversation
from tunelab.errors import ConfigError, TunelabError, read_yaml
from tunelab.eval import metrics as M
from tunelab.eval.config import EvalConfig, load_eval_config
from tunelab.eval.general import general_path
from tunelab.eval.generate import generate, reference_loss
from tunelab.rundir import RunDir

Log = Callable[[str], None]
RESULTS_NAME = "results.json"


@dataclass
class Target:
    """One model to evaluate: the base (kind='base') or a fine-tuned run folder (kind='run')."""

    name: str
    kind: str
    system_prompt: str | None = None
    run_dir: Path | None = None
    adapter: Path | None = None
    full_model: Path | None = None
    mix_fraction: float | None = None


@dataclass
class EvalPlan:
    run_config: RunConfig
    eval_config: EvalConfig
    config_dir: Path
    data: Path
    targets: list[Target]
    outputs: list[Path] = field(default_factory=list)


def _read_config(path: Path) -> RunConfig:
    """A run's config.yaml (already resolved when it was written) or a config YAML, validated once by the one
    RunConfig, its `eval:` section included; paths in it are relative to its folder."""
    from tunelab.config_paths import resolve_paths

    return config_from_dict(resolve_paths(read_yaml(path, mapping=True), path.parent), str(path))


def _run_target(run_dir: Path, index: int, names: set[str]) -> tuple[Target, RunConfig]:
    rd = RunDir(run_dir)
    if not rd.is_run():
        raise TunelabError(f"{run_dir}: not a tunelab run folder (no config.yaml)", 2)
    cfg = _read_config(rd.config_path)
    if rd.weights is None:
        raise TunelabError(f"{run_dir}: no adapter/ (PEFT) or model/ folder: has the run finished?", 2)
    name = run_dir.resolve().name
    if name in names or name == "base":
        name = f"{name}-{index}"
    names.add(name)
    mix = cfg.data.mix.fraction if cfg.data.mix else None
    return (
        Target(
            name=name, kind="run", system_prompt=cfg.data.system_prompt, run_dir=run_dir,
            adapter=rd.adapter, full_model=rd.full_model, mix_fraction=mix,
        ),
        cfg,
    )


def plan(
    config_or_run: str | Path,
    *,
    data: str | Path | None = None,
    runs: Sequence[str | Path] = (),
    system_prompt: str | None = None,
    eval_config: str | Path | None = None,
    out: str | Path | None = None,
) -> EvalPlan:
    """Resolve what to evaluate. CONFIG_OR_RUN is a run folder (evaluated with its base) or a run config YAML
    (base model only, plus any --run folders)."""
    src = Path(config_or_run)
    run_dirs: list[Path] = []
    if src.is_dir():
        run_dirs.append(src)
        cfg_path = RunDir(src).config_path
        if not cfg_path.is_file():
            raise TunelabError(f"{src}: not a tunelab run folder (no config.yaml)", 2)
    elif src.is_file():
        cfg_path = src
    else:
        raise ConfigError(f"{src}: no such config file or run folder")
    run_cfg = _read_config(cfg_path)
    ev = run_cfg.eval
    if eval_config is not None:
        ev = load_eval_config(eval_config)
    run_dirs += [Path(r) for r in runs]
    names: set[str] = set()
    targets = [Target("base", "base", system_prompt if system_prompt is not None else ev.system_prompt)]
    for i, rd in enumerate(run_dirs):
        t, cfg = _run_target(rd, i, names)
        if cfg.model.name != run_cfg.model.name and t.adapter is not None:
            raise ConfigError(
                f"{rd}: trained on base {cfg.model.name!r}, but the evaluation's base is {run_cfg.model.name!r}"
            )
        targets.append(t)
    data_path = Path(data) if data else (Path(run_cfg.data.test) if run_cfg.data.test else None)
    if data_path is None:
        raise ConfigError("no evaluation data: pass --data TEST.jsonl or set data.test in the config")
    if not data_path.is_file():
        raise ConfigError(f"{data_path}: evaluation data file not found")
    if out is not None:
        outs = [Path(out)]
    elif run_dirs:
        outs = [RunDir(rd).results_path for rd in run_dirs]
    else:
        outs = [RunDir(run_cfg.output_dir).eval_dir / "base-results.json"]
    return EvalPlan(run_cfg, ev, cfg_path.resolve().parent, data_path, targets, outs)


def load_eval_data(path: Path, max_examples: int | None = None) -> list[Conversation]:
    convs = read_conversations(path)
    if not convs:
        raise TunelabError(f"{path}: no examples", 1)
    missing = [c for c in convs if not c.completion or not c.prompt]
    if missing:
        where = f"{path}:{missing[0].source.line}" if missing[0].source else str(path)
        raise TunelabError(f"{where}: evaluation examples need a prompt and a reference assistant answer", 1)
    return convs[:max_examples] if max_examples else convs


def _prompt_text(c: Conversation) -> str:
    return "\n\n".join(f"{m.role}: {m.content}" for m in c.prompt)


def score_outputs(
    metric_fns: dict[str, M.MetricFn],
    convs: Sequence[Conversation],
    outputs: Sequence[str],
    corpus: Sequence[str] = (),
) -> tuple[list[dict[str, float | None]], dict[str, float | None]]:
    """Per-example scores and their aggregates (corpus-level BLEU/chrF where those were asked for)."""
    per: list[dict[str, float | None]] = []
    for c, o in zip(convs, outputs, strict=True):
        row: dict[str, float | None] = {}
        for name, fn in metric_fns.items():
            try:
                v = fn(_prompt_text(c), o, c.completion)
            except Exception as e:  # a user metric that crashes must say which one
                raise TunelabError(f"metric {name!r} failed on {c.source or 'an example'}: {e}") from e
            row[name] = None if v is None else float(v)
        per.append(row)
    agg = {name: M.mean([r[name] for r in per]) for name in metric_fns}
    refs = [c.completion for c in convs]
    for name in corpus:
        if name in M.CORPUS:
            agg[name] = M.CORPUS[name](outputs, refs)
    return per, agg


def _load_base(cfg: RunConfig) -> tuple[Any, Any]:
    from tunelab.model.loading import load_model

    # Evaluation never quantizes: a QLoRA adapter applies to the same weights in bf16/fp32.
    return load_model(
        cfg.model.name, dtype=cfg.model.dtype, gguf_file=cfg.model.gguf_file, trust_remote_code=cfg.model.trust_remote_code
    )


def _attach(model: Any, target: Target, slot: str) -> Any:
    """Attach a run's adapter under `slot` (PEFT adapter names may not contain dots) and make it active."""
    from peft import PeftModel

    assert target.adapter is not None
    try:
        if isinstance(model, PeftModel):
            model.load_adapter(str(target.adapter), adapter_name=slot)
        else:
            model = PeftModel.from_pretrained(model, str(target.adapter), adapter_name=slot)
    except (RuntimeError, ValueError, KeyError) as e:
        raise TunelabError(f"{target.adapter}: adapter does not fit the base model: {str(e).splitlines()[0]}", 2) from e
    model.set_adapter(slot)
    model.eval()
    return model


def _reusable_base(prev: dict[str, Any] | None, p: EvalPlan, names: list[str], fingerprint: dict[str, Any]) -> dict[str, Any] | None:
    """The base model's entry from earlier results when it was produced by the same data, system prompt,
    metrics and decoding (so its numbers are exactly what re-running would give), else None."""
    if not prev or prev.get("kind") != "tunelab-eval" or not prev.get("targets"):
        return None
    b = prev["targets"][0]
    same = (
        b.get("kind") == "base" and b.get("system_prompt") == p.targets[0].system_prompt
        and prev.get("fingerprint") == fingerprint and prev.get("metrics") == ["loss", "perplexity", *names]
    )
    return prev if same else None


def evaluate(
    p: EvalPlan, log: Log = lambda s: None, models: tuple[Any, Any] | None = None,
    baseline: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every target over the evaluation data (and the general set); return the results dict.
    `models` (model, tokenizer) skips loading the base, for tests and callers that hold one already.
    `baseline`: earlier results (e.g. the base model scored before training) whose base entry is reused
    when data, system prompt, metrics and decoding are identical -- the baseline is computed once."""
    ev = p.eval_config
    convs = load_eval_data(p.data, ev.max_examples)
    schema = ev.resolved_schema(p.config_dir)
    names = [m for m in ev.metrics if not (m == "schema" and schema is None)]
    fns = M.build(names, schema=schema, fields=ev.fields, lenient_json=ev.lenient_json)
    for spec in ev.user_metrics:
        fns[M.user_metric_name(spec)] = M.load_user_metric(spec)
    general: list[Conversation] = []
    if ev.forgetting:
        gpath = Path(ev.general_data) if ev.general_data else general_path("eval")
        general = load_eval_data(gpath, ev.general_max_examples)
    gen_general = ev.generation.model_copy(update={"max_new_tokens": ev.general_max_new_tokens})
    max_len = p.run_config.data.max_seq_len

    base_model, tok = models if models is not None else _load_base(p.run_config)
    model = base_model
    results: list[dict[str, Any]] = []
    outputs: dict[str, list[str]] = {}
    per_example: dict[str, list[dict[str, float | None]]] = {}
    fingerprint = {
        "data_sha256": _sha256(p.data), "n_examples": len(convs), "generation": ev.generation.model_dump(),
        "general": hashlib.sha256("\n".join(c.key() for c in general).encode()).hexdigest(),
        "general_max_new_tokens": ev.general_max_new_tokens,
        "base_model": p.run_config.model.name, "dtype": p.run_config.model.dtype, "max_len": max_len,
        "scoring": hashlib.sha256(json.dumps([schema, ev.fields, ev.lenient_json, ev.user_metrics],
                                             sort_keys=True).encode()).hexdigest(),
    }
    prev = _reusable_base(baseline, p, list(fns), fingerprint)
    for i, t in enumerate(p.targets):
        t0 = time.time()
        if i == 0 and prev is not None:
            log(f"[{t.name}] reusing the baseline from earlier results ({prev.get('created')})")
            results.append(prev["targets"][0])
            outputs[t.name] = [e["outputs"][prev["targets"][0]["name"]] for e in prev["examples"]]
            per_example[t.name] = [e["scores"][prev["targets"][0]["name"]] for e in prev["examples"]]
            continue
        if t.kind == "run" and t.full_model is not None and t.adapter is None:
            from tunelab.model.loading import load_model

            cur, cur_tok = load_model(str(t.full_model), dtype=p.run_config.model.dtype)
        elif t.kind == "run":
            model = _attach(model, t, f"run{i}")
            cur, cur_tok = model, tok
        else:
            cur, cur_tok = model, tok
        log(f"[{t.name}] generating {len(convs)} answers")
        outs = generate(cur, cur_tok, convs, ev.generation, system_prompt=t.system_prompt)
        log(f"[{t.name}] reference loss")
        lr = reference_loss(cur, cur_tok, convs, system_prompt=t.system_prompt,
                            batch_size=ev.generation.batch_size, max_len=max_len)
        per, agg = score_outputs(fns, convs, outs, corpus=[n for n in names if n in M.CORPUS])
        agg = {"loss": lr.loss, "perplexity": lr.perplexity, **agg}
        entry: dict[str, Any] = {
            "name": t.name, "kind": t.kind, "system_prompt": t.system_prompt,
            "run_dir": str(t.run_dir) if t.run_dir else None, "adapter": str(t.adapter) if t.adapter else None,
            "mix_fraction": t.mix_fraction, "metrics": agg, "reference_tokens": lr.tokens,
        }
        if general:
            log(f"[{t.name}] general set ({len(general)} examples)")
            gouts = generate(cur, cur_tok, general, gen_general)
            gscores = [M.contains_answer(o, c.completion) for o, c in zip(gouts, general, strict=True)]
            entry["general"] = {"accuracy": M.mean(gscores), "n": len(general), "outputs": gouts, "scores": gscores}
        entry["seconds"] = round(time.time() - t0, 2)
        results.append(entry)
        outputs[t.name] = outs
        per_example[t.name] = per
        for j, row in enumerate(per):
            row["loss"] = lr.per_example[j]

    forgetting = {}
    base_entry = results[0]
    if general:
        b = base_entry["general"]["accuracy"]
        for r in results[1:]:
            a = r["general"]["accuracy"]
            forgetting[r["name"]] = {"base": b, "finetuned": a, "delta": a - b, "mix_fraction": r["mix_fraction"]}
    examples = [
        {
            "index": j,
            "line": c.source.line if c.source else None,
            "prompt": [m.to_json() for m in c.prompt],
            "reference": c.completion,
            "outputs": {name: outputs[name][j] for name in outputs},
            "scores": {name: per_example[name][j] for name in per_example},
        }
        for j, c in enumerate(convs)
    ]
    return {
        "kind": "tunelab-eval",
        "version": 1,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "data": str(p.data),
        "n_examples": len(convs),
        "base_model": p.run_config.model.name,
        "generation": {**ev.generation.model_dump(), "do_sample": False, "num_beams": 1},
        "general_generation": {**gen_general.model_dump(), "do_sample": False, "num_beams": 1} if general else None,
        "metrics": ["loss", "perplexity", *fns],
        "fingerprint": fingerprint,
        "eval_config": ev.model_dump(mode="json"),
        "targets": results,
        "forgetting": forgetting,
        "examples": examples,
    }


def run_eval(config_or_run: str | Path, *, log: Log = lambda s: None, **plan_kwargs: Any) -> tuple[dict[str, Any], list[Path]]:
    """plan + evaluate + write: what `tunelab eval` does, for callers such as the demo."""
    p = plan(config_or_run, **plan_kwargs)
    res = evaluate(p, log=log)
    for path in p.outputs:
        write_json(path, res)
    return res, p.outputs


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_json(path: Path, data: Any) -> None:
    """Atomic write: a reader never sees half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(data, f, indent=1, ensure_ascii=False)
    os.replace(tmp, path)


def read_results(path: str | Path) -> dict[str, Any]:
    """A results JSON, or a run folder (its eval/results.json)."""
    p = Path(path)
    if p.is_dir():
        p = RunDir(p).results_path
    if not p.is_file():
        raise TunelabError(f"{p}: no evaluation results (run `tunelab eval` first)", 2)
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except ValueError as e:
        raise TunelabError(f"{p}: not valid JSON: {e}", 2) from None
    if not isinstance(data, dict) or data.get("kind") != "tunelab-eval":
        raise TunelabError(f"{p}: not a tunelab evaluation results file", 2)
    return data


def results_table(results: dict[str, Any]) -> Any:
    """A rich Table: one row per metric, one column per model, with the change against the base."""
    from rich.table import Table

    targets = results["targets"]
    tab = Table(title=f"evaluation on {results['data']} ({results['n_examples']} examples)")
    tab.add_column("metric")
    for t in targets:
        label = t["name"] + (" +system prompt" if t["kind"] == "base" and t.get("system_prompt") else "")
        tab.add_column(label, justify="right")
    rows = list(results["metrics"])
    for m in rows:
        cells = []
        base_v = targets[0]["metrics"].get(m)
        for k, t in enumerate(targets):
            v = t["metrics"].get(m)
            cell = fmt(v)
            if k and v is not None and base_v is not None:
                cell += f" ({v - base_v:+.3f})" if abs(v) < 10 and abs(base_v) < 10 else f" ({v - base_v:+.1f})"
            cells.append(cell)
        tab.add_row(m, *cells)
    if results.get("forgetting") or any("general" in t for t in targets):
        cells = [fmt(t.get("general", {}).get("accuracy")) for t in targets]
        tab.add_row("general accuracy", *cells)
    return tab


def fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
    return str(v)
