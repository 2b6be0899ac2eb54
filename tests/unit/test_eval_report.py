"""`tunelab report`: the HTML holds the loss curves (baseline and best step marked), the metric, win-rate and
forgetting tables and side-by-side samples, needs no network, and its plots lay out in headless Chromium."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tunelab.eval.report import render, write_report

CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)


def _results() -> dict[str, Any]:
    def target(name: str, kind: str, jv: float, fa: float, loss: float, gen: float, mix: float | None = None) -> dict[str, Any]:
        return {"name": name, "kind": kind, "system_prompt": "Reply with JSON." if kind == "base" else None,
                "mix_fraction": mix, "metrics": {"loss": loss, "perplexity": 2.718 ** loss, "json_valid": jv,
                                                 "field_accuracy": fa, "bleu": 20.0},
                "general": {"accuracy": gen, "n": 60, "outputs": [], "scores": []}}

    return {
        "kind": "tunelab-eval", "version": 1, "data": "test.jsonl", "n_examples": 2,
        "generation": {"max_new_tokens": 64, "batch_size": 8, "do_sample": False},
        "metrics": ["loss", "perplexity", "json_valid", "field_accuracy", "bleu"],
        "eval_config": {"samples_in_report": 2},
        "targets": [target("base", "base", 0.25, 0.1, 1.9, 0.5), target("ft-nomix", "run", 1.0, 0.8, 0.4, 0.3),
                    target("ft-mix20", "run", 1.0, 0.75, 0.45, 0.48, 0.2)],
        "forgetting": {"ft-nomix": {"base": 0.5, "finetuned": 0.3, "delta": -0.2, "mix_fraction": None},
                       "ft-mix20": {"base": 0.5, "finetuned": 0.48, "delta": -0.02, "mix_fraction": 0.2}},
        "examples": [
            {"index": i, "prompt": [{"role": "user", "content": f"note <b>{i}</b> & more"}], "reference": '{"a": 1}',
             "outputs": {"base": "Sure! Here is", "ft-nomix": '{"a": 1}', "ft-mix20": '{"a": 2}'},
             "scores": {"base": {"json_valid": 0.0}, "ft-nomix": {"json_valid": 1.0}, "ft-mix20": {"json_valid": 1.0}}}
            for i in range(3)
        ],
    }


@pytest.fixture
def run(tmp_path: Path) -> Path:
    r = tmp_path / "demo-run"
    (r / "eval").mkdir(parents=True)
    rows: list[dict[str, Any]] = [{"step": 0, "baseline": True, "valid_loss": 2.0}]
    for s in range(1, 31):
        rows.append({"step": s, "train_loss": 2.0 * 0.93 ** s, "lr": 1e-4})
        if s % 5 == 0:
            rows.append({"step": s, "valid_loss": 1.0 + abs(s - 15) / 20})  # lowest at step 15, then rises
    rows.append({"step": 30, "warning": "validation loss has risen for 3 evaluations; lowest was at step 15"})
    (r / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows) + '{"step": 31, "trunc')
    (r / "state.json").write_text(json.dumps({"step": 30, "best_step": 15}))
    (r / "config.yaml").write_text(yaml.safe_dump({"model": {"name": "smollm2-135m-instruct"}, "finetune": "lora",
                                                   "data": {"train": "train.jsonl", "mix": {"path": "g", "fraction": 0.2}}}))
    (r / "eval" / "results.json").write_text(json.dumps(_results()))
    judge = {"x": "ft-nomix", "y": "base", "judge_model": "fake",
             "summary": {"n": 20, "wins": 15, "ties": 2, "losses": 3, "win_rate": 0.8, "ci95": [0.58, 0.92],
                         "swap_agreement": 0.9, "position_a_rate": 0.5, "position_bias_detected": False}}
    (r / "eval" / "judge.json").write_text(json.dumps(judge))
    (r / "eval" / "human.jsonl").write_text(
        json.dumps({"id": "0", "x": "ft-nomix", "y": "base", "x_is_a": True, "verdict": "A", "outcome": "win"}) + "\n")
    return r


def test_report_contains_curves_and_tables(run: Path) -> None:
    html = render(run)
    # Loss curves: train and validation polylines, baseline horizontal line, best-step vertical line.
    assert re.search(r'<polyline class="train-loss"[^>]*points="[^"]{50,}"', html)
    assert '<polyline class="valid-loss"' in html and html.count('class="valid-loss-pt"') == 7  # baseline + 6 evals
    assert '<line class="baseline"' in html and "baseline 2.000 (base model)" in html
    assert '<line class="best-step"' in html and "best checkpoint (step 15)" in html
    assert "Lowest validation loss <b>1.0000</b> at step 15" in html and "overfitting" in html
    assert "validation loss has risen for 3 evaluations" in html  # the loop's warning is shown
    # Metric table: base vs fine-tuned with signed deltas, loss lower-is-better coloured as an improvement.
    table = html.split('id="metric-table"')[1].split("</table>")[0]
    assert "ft-nomix" in table and "+system prompt" in table
    assert '<span class="up">(+0.750)</span>' in table  # json_valid 0.25 -> 1.0
    assert '<span class="up">(-1.500)</span>' in table  # loss 1.9 -> 0.4
    assert 'id="metric-bars"' in html and html.count('class="bar"') == 6  # 2 unit metrics x 3 models
    wr = html.split('id="winrate-table"')[1].split("</table>")[0]
    assert "0.800" in wr and "[0.580, 0.920]" in wr and "human: ft-nomix vs base" in wr
    fg = html.split('id="forgetting-table"')[1].split("</table>")[0]
    assert "none" in fg and "20%" in fg and "-0.200" in fg and "-0.020" in fg
    # Side-by-side samples: as many as configured, with user text escaped.
    assert html.count('class="sample"') == 2
    assert "note &lt;b&gt;0&lt;/b&gt; &amp; more" in html and "<b>0</b> &" not in html


def test_report_is_self_contained(run: Path) -> None:
    html = render(run)
    assert not re.search(r'(src|href)\s*=\s*["\']?(https?:)?//', html)
    assert "@import" not in html and "url(" not in html
    urls = set(re.findall(r"https?://[^\s\"'<>]+", html))
    assert urls <= {"http://www.w3.org/2000/svg"}  # the SVG namespace is a name, never fetched


def test_report_for_a_bare_run_says_what_is_missing(tmp_path: Path) -> None:
    r = tmp_path / "bare"
    r.mkdir()
    html = render(r)
    assert "No metrics.jsonl" in html and "tunelab eval RUN" in html and "tunelab judge RUN" in html
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="no such run folder"):
        render(tmp_path / "nope")


def test_cli_report(run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["report", str(run)])
    assert e.value.code == 0
    assert f"report: {run / 'report.html'}" in capsys.readouterr().out.replace("\n", "")
    assert (run / "report.html").read_text().startswith("<!DOCTYPE html>")


@pytest.mark.skipif(CHROMIUM is None, reason="headless Chromium not installed (Debian: apt-get install -y chromium)")
def test_report_plots_render_in_headless_chromium(run: Path, tmp_path: Path) -> None:
    path = write_report(run, tmp_path / "report.html")
    assert CHROMIUM is not None
    flags = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
             f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1200,3000"]
    dom = subprocess.run([*flags, "--dump-dom", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    m = re.search(r"<body[^>]*data-plots=\"([^\"]*)\"", dom.stdout)
    assert m, "the in-page probe did not run"
    plots = {p["id"]: p for p in json.loads(m.group(1).replace("&quot;", '"'))}
    assert set(plots) == {"loss-curve", "metric-bars"}
    for p in plots.values():  # laid out at full size with their marks drawn
        assert p["w"] >= 700 and p["h"] >= 290 and p["marks"] > 0
    assert plots["loss-curve"]["marks"] == 2  # train + validation curves
    shot = tmp_path / "shot.png"
    r = subprocess.run([*flags, f"--screenshot={shot}", path.as_uri()], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and shot.exists(), r.stderr[-2000:]
    import matplotlib.image as mpimg
    import numpy as np

    img = mpimg.imread(str(shot))[..., :3]
    colours = {tuple(c) for c in (img.reshape(-1, 3) * 255).astype(int)[::7]}
    assert len(colours) > 20  # curves, bars and text were painted, not a blank page
    # The palette's train-loss blue (#1f77b4) is on screen.
    assert np.any(np.all(np.abs(img * 255 - np.array([31, 119, 180])) < 3, axis=-1))
