"""The bundled preference data sets and the deterministic generator that made them.

`python -m tunelab.train.pref_data [OUT_DIR]` rewrites tunelab/resources/preference/ byte for byte (a test
checks this). Three kinds of pair, each with a rule a reader can check by eye:
  json    -- "give this record as JSON": chosen is valid JSON, rejected is broken (quotes, brace, comma, prose);
  concise -- a short factual answer vs the same answer buried in filler;
  polite  -- a courteous reply vs a rude one.
Files: pairs_train/pairs_eval (preference format), kto_train/kto_eval (unpaired: each pair contributes one
row, chosen for even pairs and rejected for odd ones, so no prompt appears with both), prompts_train/
prompts_eval (prompt/completion rows whose prompt asks for JSON; PPO and GRPO only read the prompt), and
json_sft (prompt/completion, half valid and half broken JSON: a warm start whose samples are ~50% valid).
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path
from typing import Any

from tunelab.resources import resource as bundled

RESOURCES = bundled("preference")

NAMES = ["Ann", "Bo", "Cy", "Di", "Ed", "Flo", "Gus", "Hal", "Ivy", "Jo", "Kai", "Lu", "Max", "Ned", "Oz", "Pia"]
CITIES = ["Oslo", "Rome", "Lima", "Kyiv", "Doha", "Bern", "Riga", "Nice", "Cork", "Graz"]
FILLER = [
    "Well, that is a really great question and I am glad you asked it.",
    "Let me think about this very carefully before I answer you.",
    "There are many ways one could look at this, so bear with me.",
]
FACTS = [
    ("What is {a} plus {b}?", lambda a, b: f"{a + b}."),
    ("What is {a} times {b}?", lambda a, b: f"{a * b}."),
    ("Which is larger, {a} or {b}?", lambda a, b: f"{max(a, b)}."),
]
REQUESTS = [
    "Can you help me reset my password?",
    "Where can I find my invoice?",
    "How do I change my email address?",
    "Can I cancel my order?",
]
POLITE = ["Of course, happy to help! {s} Let me know if anything is unclear.", "Certainly! {s} Have a nice day."]
RUDE = ["Figure it out yourself.", "Not my problem. {s}", "Ugh, fine. {s} Stop asking."]
STEPS = ["Open Settings and choose Account.", "Go to the Billing page.", "Use the link in your welcome email."]


def record(rng: random.Random) -> tuple[str, dict[str, Any]]:
    name, age, city = rng.choice(NAMES), rng.randint(18, 90), rng.choice(CITIES)
    return f"Give the record as JSON: name={name} age={age} city={city}", {"name": name, "age": age, "city": city}


def broken_json(rng: random.Random, obj: dict[str, Any]) -> str:
    good = json.dumps(obj)
    kind = rng.randrange(5)
    if kind == 0:
        return good.replace('"', "'")
    if kind == 1:
        return good[:-1]
    if kind == 2:
        return good[:-1] + ",}"
    if kind == 3:
        return "{" + ", ".join(f"{k}: {v}" for k, v in obj.items()) + "}"
    return f"The name is {obj['name']}, age {obj['age']}, from {obj['city']}."


def make_pair(rng: random.Random, kind: str) -> dict[str, str]:
    if kind == "json":
        prompt, obj = record(rng)
        return {"prompt": prompt, "chosen": json.dumps(obj), "rejected": broken_json(rng, obj)}
    if kind == "concise":
        q, f = rng.choice(FACTS)
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        ans = f(a, b)
        verbose = " ".join(rng.sample(FILLER, 2)) + f" I believe the answer is {ans[:-1]}, if I am not mistaken."
        return {"prompt": q.format(a=a, b=b), "chosen": ans, "rejected": verbose}
    req, step = rng.choice(REQUESTS), rng.choice(STEPS)
    return {"prompt": req, "chosen": rng.choice(POLITE).format(s=step), "rejected": rng.choice(RUDE).format(s=step)}


def pairs(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    kinds = ["json", "concise", "polite"]
    out: list[dict[str, str]] = []
    seen: set[tuple[str, str, str]] = set()
    while len(out) < n:
        p = make_pair(rng, kinds[len(out) % 3])
        key = (p["prompt"], p["chosen"], p["rejected"])
        if key not in seen:  # exact duplicates would be flagged by `tunelab data validate`
            seen.add(key)
            out.append(p)
    return out


def kto_rows(prs: list[dict[str, str]]) -> list[dict[str, Any]]:
    rows: dict[tuple[str, str], dict[str, Any]] = {}
    for i, p in enumerate(prs):
        completion = p["chosen"] if i % 2 == 0 else p["rejected"]
        row = {"prompt": p["prompt"], "completion": completion, "label": i % 2 == 0}
        rows.setdefault((p["prompt"], completion), row)  # short polite/rude replies repeat
    return list(rows.values())


def json_prompts(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    out: dict[str, str] = {}
    while len(out) < n:
        prompt, obj = record(rng)
        out[prompt] = json.dumps(obj)
    return [{"prompt": p, "completion": c} for p, c in out.items()]


def json_sft(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(seed)
    rows = []
    for i, r in enumerate(json_prompts(n, seed)):
        obj = json.loads(r["completion"])
        rows.append({"prompt": r["prompt"], "completion": r["completion"] if i % 2 == 0 else broken_json(rng, obj)})
    return rows


def build() -> dict[str, list[dict[str, Any]]]:
    train, evl = pairs(120, seed=1), pairs(30, seed=2)
    train_keys = {p["prompt"] + p["chosen"] for p in train}
    evl = [p for p in evl if p["prompt"] + p["chosen"] not in train_keys]  # held out means unseen
    prompts = json_prompts(56, seed=3)
    return {
        "pairs_train": train,
        "pairs_eval": evl,
        "kto_train": kto_rows(train),
        "kto_eval": kto_rows(evl),
        "prompts_train": prompts[:40],
        "prompts_eval": prompts[40:],
        "json_sft": json_sft(64, seed=4),
    }


def write(out_dir: Path = RESOURCES) -> list[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in build().items():
        p = out_dir / f"{name}.jsonl"
        p.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        paths.append(p)
    return paths


def resource(name: str) -> Path:
    """Path of a bundled file by stem, e.g. resource("pairs_train")."""
    p = RESOURCES / f"{name}.jsonl"
    if not p.exists():
        from tunelab.errors import TunelabError

        raise TunelabError(f"no bundled preference file {name!r} in {RESOURCES}", 2)
    return p


if __name__ == "__main__":  # pragma: no cover
    for path in write(Path(sys.argv[1]) if len(sys.argv) > 1 else RESOURCES):
        print(path)
