"""Blind pairwise comparison of two models' answers: by an LLM judge behind any OpenAI-compatible chat
endpoint, or by a person at the terminal (`--human`, resumable).

The judge sees the two answers as "A" and "B" in a random order that is recorded; with `both_orders` it is
asked again with the order swapped, which measures position bias (a fair judge names the same *model* both
times). Verdicts that flip with the order count as ties. Summary: win/tie/loss, win rate = (wins + ties/2) / n
with a 95% Wilson interval, the swap agreement, and the share of decisive verdicts that picked position A
(0.5 for an unbiased judge, exactly, because every pair is shown both ways).
"""

from __future__ import annotations

import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError, TunelabError
from tunelab.eval.config import JudgeSettings

_VERDICT = re.compile(r"\b(TIE|A|B)\b", re.IGNORECASE)


@dataclass(frozen=True)
class Pair:
    """One prompt and the answers of model X (the candidate) and model Y (the reference model, e.g. base)."""

    id: str
    prompt: str
    x: str
    y: str


def wilson(successes: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a proportion; well-behaved at 0, 1 and small n (unlike the normal one)."""
    if n <= 0:
        return (0.0, 1.0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def parse_verdict(text: str) -> str:
    """'A', 'B', 'tie' or 'invalid' from a judge reply (the first verdict word it contains)."""
    m = _VERDICT.search(text or "")
    if not m:
        return "invalid"
    v = m.group(1).upper()
    return "tie" if v == "TIE" else v


def pairs_from_results(results: dict[str, Any], x: str | None = None, y: str | None = None) -> tuple[list[Pair], str, str]:
    """Pairs from an evaluation results dict: X defaults to the first fine-tuned run, Y to the base."""
    names = [t["name"] for t in results["targets"]]
    y = y or names[0]
    x = x or (names[1] if len(names) > 1 else None)
    if x is None:
        raise TunelabError("the results hold only one model; evaluate a fine-tuned run too (--run RUN)", 2)
    for n in (x, y):
        if n not in names:
            raise TunelabError(f"no model named {n!r} in the results (have: {', '.join(names)})", 2)
    pairs = []
    for ex in results["examples"]:
        prompt = "\n\n".join(m["content"] for m in ex["prompt"] if m["role"] != "system")
        pairs.append(Pair(str(ex["index"]), prompt, ex["outputs"][x], ex["outputs"][y]))
    return pairs, x, y


def summarize(outcomes: Sequence[str], position_picks: Sequence[str] = (), agreements: Sequence[bool] = ()) -> dict[str, Any]:
    """outcomes: 'win' | 'tie' | 'loss' for X per pair. position_picks: 'A'/'B'/'tie' per judge call."""
    w, t, lo = (sum(1 for o in outcomes if o == k) for k in ("win", "tie", "loss"))
    n = w + t + lo
    rate = (w + 0.5 * t) / n if n else float("nan")
    lo_ci, hi_ci = wilson(w + 0.5 * t, n)
    out: dict[str, Any] = {"n": n, "wins": w, "ties": t, "losses": lo, "win_rate": rate, "ci95": [lo_ci, hi_ci]}
    decisive = [p for p in position_picks if p in ("A", "B")]
    if decisive:
        a = sum(1 for p in decisive if p == "A")
        ci = wilson(a, len(decisive))
        out["position_a_rate"] = a / len(decisive)
        out["position_a_ci95"] = list(ci)
        out["position_bias_detected"] = ci[0] > 0.5 or ci[1] < 0.5
    if agreements:
        out["swap_agreement"] = sum(agreements) / len(agreements)
    return out


class Judge:
    """Ask an OpenAI-compatible chat endpoint which of two answers is better."""

    def __init__(self, settings: JudgeSettings, client: Any | None = None) -> None:
        if client is None and settings.base_url == "local" and settings.model:
            from tunelab.generate import Generator, LocalChatClient

            client = LocalChatClient(Generator.load(settings.model))  # generates in this process, via the engine
        if client is None:
            if not settings.base_url or not settings.model:
                raise ConfigError("judge: set eval.judge.base_url and eval.judge.model (or --base-url/--model)")
            from openai import OpenAI

            # Local servers accept any key; hosted ones read it from the named environment variable.
            key = os.environ.get(settings.api_key_env) or "not-needed"
            client = OpenAI(base_url=settings.base_url, api_key=key, timeout=settings.timeout_s, max_retries=2)
        self.client = client
        self.s = settings

    def ask(self, prompt: str, answer_a: str, answer_b: str) -> tuple[str, str]:
        """(verdict, raw reply)."""
        try:
            text = self.s.prompt.format(rubric=self.s.rubric, prompt=prompt, answer_a=answer_a, answer_b=answer_b)
        except (KeyError, IndexError) as e:
            raise ConfigError(f"eval.judge.prompt: unknown placeholder {e}; use {{rubric}} {{prompt}} {{answer_a}} {{answer_b}}") from None
        try:
            resp = self.client.chat.completions.create(
                model=self.s.model or "judge",
                messages=[{"role": "user", "content": text}],
                temperature=self.s.temperature,
                max_tokens=self.s.max_tokens,
            )
        except Exception as e:
            raise TunelabError(f"judge endpoint {self.s.base_url}: request failed: {e}", 3) from e
        reply = resp.choices[0].message.content or ""
        return parse_verdict(reply), reply


def _to_model(verdict: str, x_is_a: bool) -> str:
    """Map a position verdict to X's outcome."""
    if verdict == "tie" or verdict == "invalid":
        return "tie"
    x_won = (verdict == "A") == x_is_a
    return "win" if x_won else "loss"


def judge_pairs(pairs: Sequence[Pair], judge: Judge, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Judge every pair blind; returns {'pairs': [...records], 'summary': {...}}."""
    rng = random.Random(judge.s.seed)
    orders = [rng.random() < 0.5 for _ in pairs]  # True: X shown as A first; drawn up front so it is seeded

    def one(k: int) -> dict[str, Any]:
        p, x_first = pairs[k], orders[k]
        calls = []
        for x_is_a in ([x_first, not x_first] if judge.s.both_orders else [x_first]):
            a, b = (p.x, p.y) if x_is_a else (p.y, p.x)
            verdict, raw = judge.ask(p.prompt, a, b)
            calls.append({"x_is_a": x_is_a, "verdict": verdict, "reply": raw[:200], "outcome": _to_model(verdict, x_is_a)})
        outs = {c["outcome"] for c in calls}
        # Two orders that disagree reveal the verdict followed position, not content: count as a tie.
        outcome = calls[0]["outcome"] if len(outs) == 1 else "tie"
        if progress:
            progress(1)
        return {"id": p.id, "calls": calls, "outcome": outcome, "agree": len(outs) == 1}

    with ThreadPoolExecutor(max_workers=judge.s.concurrency) as pool:
        records = list(pool.map(one, range(len(pairs))))
    picks = [c["verdict"] for r in records for c in r["calls"]]
    summary = summarize(
        [r["outcome"] for r in records], picks, [r["agree"] for r in records] if judge.s.both_orders else ()
    )
    summary["invalid_replies"] = sum(1 for v in picks if v == "invalid")
    return {"pairs": records, "summary": summary}


# --- human mode ---------------------------------------------------------------------------------------------


def _read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    if not path.exists():
        return
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            try:
                yield json.loads(line)
            except ValueError:
                continue  # a line cut short by a kill: that pair is asked again


def human_judge(
    pairs: Sequence[Pair],
    out: Path,
    *,
    x_name: str,
    y_name: str,
    seed: int = 0,
    ask: Callable[[str], str] = input,
    show: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Show each not-yet-judged pair as A/B in a random order and append the choice to `out` (JSONL).
    Re-running skips pairs already in the file, so a session can stop (q) and continue later."""
    done = {r["id"] for r in _read_jsonl(out)}
    rng = random.Random(seed)
    todo = [(p, rng.random() < 0.5) for p in pairs]  # order per pair is stable across sessions (same seed)
    todo = [(p, o) for p, o in todo if p.id not in done]
    out.parent.mkdir(parents=True, exist_ok=True)
    total = len(pairs)
    for p, x_is_a in todo:
        a, b = (p.x, p.y) if x_is_a else (p.y, p.x)
        show(f"\n=== pair {p.id} ({len(done) + 1}/{total}) ===\n[prompt]\n{p.prompt}\n\n[A]\n{a}\n\n[B]\n{b}\n")
        while True:
            try:
                choice = ask("better? [a]/[b]/[t]ie, [s]kip, [q]uit: ").strip().lower()
            except EOFError:
                choice = "q"
            if choice in ("a", "b", "t", "s", "q"):
                break
            show("please type a, b, t, s or q")
        if choice == "q":
            break
        if choice == "s":
            continue
        record_human_verdict(out, p.id, x_name=x_name, y_name=y_name, x_is_a=x_is_a,
                             verdict={"a": "A", "b": "B", "t": "tie"}[choice])
        done.add(p.id)
    return summarize_human(out)


def record_human_verdict(out: Path, pair_id: str, *, x_name: str, y_name: str, x_is_a: bool, verdict: str,
                         **extra: Any) -> dict[str, Any]:
    """Append one person's verdict ('A', 'B' or 'tie' for the answers as shown) to the human store `out`
    (JSONL; `summarize_human` reads it). The web console's blind rating writes here too."""
    if verdict not in ("A", "B", "tie"):
        raise TunelabError(f"verdict must be 'A', 'B' or 'tie', got {verdict!r}", 2)
    rec = {"id": pair_id, "x": x_name, "y": y_name, "x_is_a": x_is_a, "verdict": verdict,
           "outcome": _to_model(verdict, x_is_a), **extra}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def summarize_human(path: Path) -> dict[str, Any]:
    recs = list(_read_jsonl(path))
    s = summarize([r["outcome"] for r in recs], [r["verdict"] for r in recs])
    if recs:
        s["x"], s["y"] = recs[0]["x"], recs[0]["y"]
    return s
