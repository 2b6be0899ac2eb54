"""The "Before training: the advice" section of the HTML report, from RUN/plan/advice.json."""

from __future__ import annotations

import json
from html import escape
from pathlib import Path
from typing import Any

ADVICE = Path("plan") / "advice.json"
ORDER = ("prompting", "retrieval", "fine-tune")


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{v:.1%}"


def plan_section(run: Path) -> str:
    p = run / ADVICE
    if not p.is_file():
        return ""
    try:
        adv = json.loads(p.read_text(encoding="utf-8"))
    except ValueError:
        return f'<h2>Before training: the advice</h2><p class="muted">{escape(str(p))}: not valid JSON.</p>'
    if not isinstance(adv, dict) or adv.get("kind") != "tunelab-advice":
        return ""
    metric = adv["metric"]
    rows = []
    for name in ORDER:
        o = adv["options"].get(name)
        if o is None:
            continue
        rows.append(f"<tr><td>{escape(name)}</td><td>{_pct(o.get(metric))}</td><td>{o['prompt_tokens']:.0f}</td>"
                    f"<td>{o['latency_s']:.2f}</td><td>{o['training_s']:.0f}</td></tr>")
    cd = adv.get("constrained_decoding", {})
    state = "" if cd.get("available") else "unavailable: "
    rows.append(f"<tr><td>constrained decoding</td><td colspan=4 class=muted>{state}{escape(cd.get('reason', ''))}"
                "</td></tr>")
    rec = adv["recommendation"]
    reasons = "".join(f"<li>{escape(r)}</li>" for r in rec["reasons"])
    return (f"<h2>Before training: the advice</h2><p class=note>`tunelab plan advise` on {adv['n_examples']} "
            f"examples of <code>{escape(adv['data'])}</code>, scored by {escape(metric)}.</p>"
            f'<table id="advice-table"><tr><th>option</th><th>{escape(metric)}</th><th>prompt tokens/call</th>'
            f"<th>latency s/call</th><th>training s</th></tr>{''.join(rows)}</table>"
            f"<p><b>Recommendation: {escape(rec['choice'])}</b></p><ul>{reasons}</ul>")
