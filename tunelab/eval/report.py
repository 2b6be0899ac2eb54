"""`tunelab report RUN`: one self-contained HTML file per run (inline SVG plots, inline CSS, no network).

Reads what a run folder holds: `metrics.jsonl` (rows with `step` and `train_loss` or `valid_loss`; the row
with `"baseline": true` is the base model's validation loss before the first step), `state.json`
(`best_step`, falling back to the newest checkpoint's), `config.yaml`, and what evaluation wrote under
`eval/`: `results.json` (tunelab eval), `judge.json` (tunelab judge) and `human.jsonl` (tunelab judge --human).
Every section is optional: the report shows what exists and says what is missing.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
from html import escape
from pathlib import Path
from typing import Any

import yaml

from tunelab.errors import TunelabError
from tunelab.eval.judge import summarize_human
from tunelab.eval.svg import PALETTE, Marker, Series, bar_chart, line_chart
from tunelab.rundir import RunDir

REPORT_NAME = "report.html"
UNIT_METRICS = ("exact_match", "json_valid", "schema", "field_accuracy", "rouge_l", "contains_answer")

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2em auto;max-width:1100px;color:#222;padding:0 1em}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0}td,th{border:1px solid #ddd;padding:.3em .6em;text-align:right}
th{background:#f4f4f4}td:first-child,th:first-child{text-align:left}
.up{color:#08792b}.down{color:#b3261e}.note{color:#555;font-size:.92em}.warn{color:#9a5b00;font-weight:bold}
.sample{border:1px solid #ddd;border-radius:6px;margin:1em 0;padding:.6em}
.cols{display:grid;grid-template-columns:repeat(auto-fit,minmax(240px,1fr));gap:.6em}
pre{white-space:pre-wrap;word-break:break-word;background:#f8f8f8;padding:.5em;margin:.2em 0;font-size:.85em}
.muted{color:#888}
"""

# Runs only in the viewer's browser, offline: records each plot's rendered size so a headless browser test can
# verify the plots actually laid out (not merely exist in the markup).
PROBE_JS = """
document.addEventListener('DOMContentLoaded',function(){var r=[];
document.querySelectorAll('svg.plot').forEach(function(s){var b=s.getBoundingClientRect();
var lines=s.querySelectorAll('polyline,rect.bar').length;r.push({id:s.id,w:Math.round(b.width),h:Math.round(b.height),marks:lines});});
document.body.setAttribute('data-plots',JSON.stringify(r));});
"""


def _read_jsonl(p: Path) -> list[dict[str, Any]]:
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                obj = json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill
            if isinstance(obj, dict):
                rows.append(obj)
    return rows


def _read_json(p: Path) -> Any:
    if not p.is_file():
        return None
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return None


def best_step(run: Path) -> int | None:
    return RunDir(run).best_step()


def _num(v: Any) -> float | None:
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v)) else None


def _f(v: Any, nd: int = 3) -> str:
    x = _num(v)
    if x is None:
        return '<span class="muted">n/a</span>'
    return f"{x:.{nd}f}" if abs(x) < 100 else f"{x:.1f}"


def _delta(v: Any, base: Any, higher_better: bool = True) -> str:
    a, b = _num(v), _num(base)
    if a is None or b is None:
        return ""
    d = a - b
    good = (d > 0) == higher_better
    cls = "up" if d != 0 and good else ("down" if d != 0 else "muted")
    return f' <span class="{cls}">({d:+.3f})</span>'


def loss_section(run: Path) -> str:
    rows = RunDir(run).metric_rows()
    tr = [(float(r["step"]), float(r["train_loss"])) for r in rows if _num(r.get("train_loss")) is not None and "step" in r]
    va = [(float(r["step"]), float(r["valid_loss"])) for r in rows
          if _num(r.get("valid_loss")) is not None and "step" in r]
    base = next((float(r["valid_loss"]) for r in rows if r.get("baseline") and _num(r.get("valid_loss")) is not None), None)
    best = best_step(run)
    if not tr and not va:
        return '<h2>Training</h2><p class="muted">No metrics.jsonl with losses in this run folder.</p>'
    markers = []
    if base is not None:
        markers.append(Marker(f"baseline {base:.3f} (base model)", y=base, color="#777", css="baseline"))
    if best is not None:
        markers.append(Marker(f"best checkpoint (step {best})", x=best, color="#2ca02c", css="best-step", dash="2 3"))
    series = []
    if tr:
        series.append(Series("train loss", tr, PALETTE[0], css="train-loss"))
    if va:
        series.append(Series("validation loss", va, PALETTE[1], markers=True, css="valid-loss"))
    chart = line_chart(series, markers, title="Loss", xlabel="optimizer step", ylabel="loss", css_id="loss-curve")
    notes = []
    if base is not None:
        notes.append(f"Baseline (base model, before training) validation loss: <b>{base:.4f}</b>.")
    trained_va = [(float(r["step"]), float(r["valid_loss"])) for r in rows
                  if _num(r.get("valid_loss")) is not None and "step" in r and not r.get("baseline")]
    if trained_va:
        s_min, v_min = min(trained_va, key=lambda p: p[1])
        notes.append(f"Lowest validation loss <b>{v_min:.4f}</b> at step {s_min:g}; last {trained_va[-1][1]:.4f} "
                     f"at step {trained_va[-1][0]:g}.")
        if trained_va[-1][1] > v_min and trained_va[-1][0] > s_min and len(trained_va) >= 3:
            notes.append('<span class="warn">Validation loss rose after its minimum while training went on: '
                         "a sign of overfitting.</span>")
    if best is not None:
        notes.append(f"The run's result is the checkpoint at step <b>{best}</b>.")
    warnings = [r["warning"] for r in rows if isinstance(r.get("warning"), str)]
    notes += [f'<span class="warn">{escape(w)}</span>' for w in warnings]
    return "<h2>Training</h2>" + chart + "".join(f'<p class="note">{n}</p>' for n in notes)


def metrics_section(res: dict[str, Any] | None) -> str:
    if not res:
        return '<h2>Evaluation</h2><p class="muted">No eval/results.json: run <code>tunelab eval RUN --data TEST.jsonl</code>.</p>'
    targets = res["targets"]
    head = "".join(
        f"<th>{escape(t['name'])}{' <span class=muted>+system prompt</span>' if t['kind'] == 'base' and t.get('system_prompt') else ''}</th>"
        for t in targets
    )
    lower_better = {"loss", "perplexity"}
    body = []
    for m in res["metrics"]:
        base_v = targets[0]["metrics"].get(m)
        cells = [f"<td>{_f(base_v)}</td>"]
        for t in targets[1:]:
            v = t["metrics"].get(m)
            cells.append(f"<td>{_f(v)}{_delta(v, base_v, m not in lower_better)}</td>")
        body.append(f"<tr><td>{escape(m)}</td>{''.join(cells)}</tr>")
    gen = res.get("generation", {})
    settings = ", ".join(f"{k}={v}" for k, v in gen.items())
    table = f'<table id="metric-table"><tr><th>metric</th>{head}</tr>{"".join(body)}</table>'
    unit = [m for m in res["metrics"] if m in UNIT_METRICS]
    chart = bar_chart(
        unit, [t["name"] for t in targets], [[_num(t["metrics"].get(m)) for t in targets] for m in unit],
        title="Metrics (0-1, higher is better)", css_id="metric-bars",
    ) if unit else ""
    sp = targets[0].get("system_prompt")
    sp_note = f'<p class="note">Base model system prompt: <code>{escape(sp)}</code></p>' if sp else ""
    return (
        f"<h2>Evaluation</h2><p class=note>{res['n_examples']} held-out examples from <code>{escape(str(res['data']))}</code>; "
        f"greedy decoding ({escape(settings)}). Loss and perplexity are on the reference answers' tokens.</p>"
        + sp_note + table + chart
    )


def _winrate_rows(label: str, s: dict[str, Any]) -> str:
    lo, hi = s.get("ci95", [None, None])
    bias = ""
    if "swap_agreement" in s:
        bias += f"agreement when swapped {_f(s['swap_agreement'], 2)}; "
    if "position_a_rate" in s:
        flag = ' <span class="warn">position bias detected</span>' if s.get("position_bias_detected") else ""
        bias += f"picked position A in {_f(s['position_a_rate'], 2)} of decisive verdicts{flag}"
    return (f"<tr><td>{escape(label)}</td><td>{s.get('n', 0)}</td><td>{s.get('wins', 0)}</td><td>{s.get('ties', 0)}</td>"
            f"<td>{s.get('losses', 0)}</td><td><b>{_f(s.get('win_rate'), 3)}</b></td><td>[{_f(lo, 3)}, {_f(hi, 3)}]</td>"
            f"<td style='text-align:left'>{bias}</td></tr>")


def winrate_section(run: Path) -> str:
    judge = _read_json(RunDir(run).eval_dir / "judge.json")
    human_path = RunDir(run).eval_dir / "human.jsonl"
    rows = []
    if isinstance(judge, dict) and "summary" in judge:
        who = f"LLM judge {judge.get('judge_model', '')}: {judge.get('x')} vs {judge.get('y')}"
        rows.append(_winrate_rows(who, judge["summary"]))
    if human_path.is_file():
        hs = summarize_human(human_path)
        if hs.get("n"):
            rows.append(_winrate_rows(f"human: {hs.get('x')} vs {hs.get('y')}", hs))
    if not rows:
        return ('<h2>Blind win rate</h2><p class="muted">Not judged yet: run <code>tunelab judge RUN</code> '
                "(LLM judge) or <code>tunelab judge RUN --human</code>.</p>")
    head = "<tr><th>judge</th><th>n</th><th>wins</th><th>ties</th><th>losses</th><th>win rate</th><th>95% CI (Wilson)</th><th>position bias</th></tr>"
    return ('<h2>Blind win rate</h2><p class="note">Win rate of the first model over the second = (wins + ties/2) / n; '
            'answers shown in random, recorded order; with both orders asked, verdicts that flip count as ties.</p>'
            f'<table id="winrate-table">{head}{"".join(rows)}</table>')


def forgetting_section(res: dict[str, Any] | None) -> str:
    if not res or not res.get("forgetting"):
        return '<h2>Forgetting</h2><p class="muted">No general-set results (eval.forgetting was off or no run was evaluated).</p>'
    rows = []
    for name, f in res["forgetting"].items():
        mix = f.get("mix_fraction")
        rows.append(f"<tr><td>{escape(name)}</td><td>{'none' if mix is None else f'{mix:.0%}'}</td><td>{_f(f['base'])}</td>"
                    f"<td>{_f(f['finetuned'])}</td><td>{_delta(f['finetuned'], f['base']).strip() or _f(None)}</td></tr>")
    n = next((t["general"]["n"] for t in res["targets"] if "general" in t), 0)
    return (f'<h2>Forgetting</h2><p class="note">Accuracy on {n} general instructions (arithmetic, capitals, opposites, '
            "rewriting) never seen in training; a drop against the base model is catastrophic forgetting, which "
            "mixing general data into training (<code>data.mix</code>) counters.</p>"
            '<table id="forgetting-table"><tr><th>run</th><th>general data mixed in</th><th>base</th><th>fine-tuned</th>'
            f"<th>change</th></tr>{''.join(rows)}</table>")


def samples_section(res: dict[str, Any] | None, n: int) -> str:
    if not res or not res.get("examples") or n <= 0:
        return ""
    out = ['<h2>Sample outputs</h2><p class="note">Side by side on the first held-out examples.</p>']
    for ex in res["examples"][:n]:
        prompt = "\n\n".join(f"[{m['role']}] {m['content']}" for m in ex["prompt"])
        cols = [f"<div><b>reference</b><pre>{escape(ex['reference'])}</pre></div>"]
        for name, text in ex["outputs"].items():
            sc = ex.get("scores", {}).get(name, {})
            shown = ", ".join(f"{k} {_num(v):.2f}" for k, v in sc.items() if _num(v) is not None and k in UNIT_METRICS)
            cols.append(f"<div><b>{escape(name)}</b> <span class=muted>{escape(shown)}</span><pre>{escape(text)}</pre></div>")
        out.append(f'<div class="sample"><b>example {ex["index"]}</b><pre>{escape(prompt)}</pre>'
                   f'<div class="cols">{"".join(cols)}</div></div>')
    return "".join(out)


def render(run: Path) -> str:
    from tunelab.plan.report import plan_section  # `tunelab plan advise` writes RUN/plan/advice.json

    if not run.is_dir():
        raise TunelabError(f"{run}: no such run folder", 2)
    cfg: dict[str, Any] = {}
    rd = RunDir(run)
    if rd.config_path.is_file():
        try:
            cfg = yaml.safe_load(rd.config_path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError:
            cfg = {}
    raw = _read_json(rd.results_path)
    res: dict[str, Any] | None = raw if isinstance(raw, dict) and raw.get("kind") == "tunelab-eval" else None
    model = (cfg.get("model") or {}).get("name", "?") if isinstance(cfg.get("model"), dict) else "?"
    data: dict[str, Any] = cfg["data"] if isinstance(cfg.get("data"), dict) else {}
    n_samples = (res or {}).get("eval_config", {}).get("samples_in_report", 8)
    summary = (f"<p>Base model <code>{escape(str(model))}</code>, fine-tuning <code>{escape(str(cfg.get('finetune', '?')))}</code>, "
               f"training data <code>{escape(str(data.get('train', '?')))}</code>"
               + (f", general data mixed in at {data['mix'].get('fraction', 0):.0%}" if isinstance(data.get("mix"), dict) else "")
               + "</p>")
    created = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = "".join([
        f"<h1>tunelab report: {escape(run.resolve().name)}</h1>", summary,
        plan_section(run), loss_section(run), metrics_section(res), winrate_section(run), forgetting_section(res),
        samples_section(res, int(n_samples)),
        f'<p class="muted">Generated {created} by tunelab report. Self-contained: no network needed.</p>',
    ])
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>tunelab report: {escape(run.name)}</title>'
            f"<style>{CSS}</style></head><body>{body}<script>{PROBE_JS}</script></body></html>")


def write_report(run: str | Path, out: str | Path | None = None) -> Path:
    r = Path(run)
    html = render(r)
    path = Path(out) if out else RunDir(r).report_path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html, encoding="utf-8")
    return path
