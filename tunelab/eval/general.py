"""The bundled general instruction set used to measure catastrophic forgetting and to mix into training.

Deterministic generator (no downloads, no licence questions): arithmetic, world capitals from a fixed table,
opposites, and rewriting/formatting tasks whose answers are checkable by `metrics.contains_answer`. Two
disjoint files are written: `train.jsonl` (for `data.mix`) and `eval.jsonl` (forgetting measurement); eval
countries, words and phrases never appear in train, so mixing cannot leak the forgetting test.

Regenerate with `python -m tunelab.eval.general` (writes tunelab/resources/general/).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunelab.resources import resource

GENERAL_DIR = resource("general")
SEED = 1234

CAPITALS: list[tuple[str, str]] = [
    ("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Portugal", "Lisbon"),
    ("Japan", "Tokyo"), ("China", "Beijing"), ("India", "New Delhi"), ("Egypt", "Cairo"), ("Kenya", "Nairobi"),
    ("Canada", "Ottawa"), ("Mexico", "Mexico City"), ("Brazil", "Brasilia"), ("Argentina", "Buenos Aires"),
    ("Peru", "Lima"), ("Chile", "Santiago"), ("Russia", "Moscow"), ("Poland", "Warsaw"), ("Greece", "Athens"),
    ("Turkey", "Ankara"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Finland", "Helsinki"),
    ("Denmark", "Copenhagen"), ("Ireland", "Dublin"), ("Austria", "Vienna"), ("Hungary", "Budapest"),
    ("Belgium", "Brussels"), ("Netherlands", "Amsterdam"), ("Switzerland", "Bern"), ("Australia", "Canberra"),
    ("New Zealand", "Wellington"), ("South Korea", "Seoul"), ("Thailand", "Bangkok"), ("Vietnam", "Hanoi"),
    ("Indonesia", "Jakarta"), ("Philippines", "Manila"), ("Iran", "Tehran"), ("Iraq", "Baghdad"),
    ("Saudi Arabia", "Riyadh"), ("Nigeria", "Abuja"), ("Ghana", "Accra"), ("Ethiopia", "Addis Ababa"),
    ("Morocco", "Rabat"), ("Cuba", "Havana"), ("Colombia", "Bogota"), ("Venezuela", "Caracas"),
    ("Ukraine", "Kyiv"), ("Czech Republic", "Prague"), ("Romania", "Bucharest"), ("Bulgaria", "Sofia"),
    ("Serbia", "Belgrade"), ("Croatia", "Zagreb"), ("Iceland", "Reykjavik"), ("Pakistan", "Islamabad"),
    ("Bangladesh", "Dhaka"), ("Nepal", "Kathmandu"), ("Malaysia", "Kuala Lumpur"), ("Singapore", "Singapore"),
    ("United Kingdom", "London"),
]

OPPOSITES: list[tuple[str, str]] = [
    ("hot", "cold"), ("big", "small"), ("fast", "slow"), ("happy", "sad"), ("up", "down"), ("open", "closed"),
    ("light", "dark"), ("early", "late"), ("full", "empty"), ("hard", "soft"), ("old", "new"), ("rich", "poor"),
    ("strong", "weak"), ("wet", "dry"), ("high", "low"), ("long", "short"), ("left", "right"),
    ("true", "false"), ("win", "lose"), ("push", "pull"), ("buy", "sell"), ("inside", "outside"),
    ("before", "after"), ("near", "far"), ("thick", "thin"), ("loud", "quiet"), ("clean", "dirty"),
    ("heavy", "light"), ("safe", "dangerous"), ("awake", "asleep"),
]

WORDS = [
    "apple", "river", "garden", "yellow", "window", "music", "planet", "silver", "forest", "candle", "bridge",
    "ocean", "pencil", "rabbit", "thunder", "violet", "orange", "mountain", "coffee", "letter", "winter",
    "summer", "castle", "dragon", "engine", "feather", "guitar", "harbor", "island", "jacket", "kitten",
    "ladder", "marble", "needle", "pillow", "rocket", "saddle", "tiger", "umbrella", "valley", "wagon", "zebra",
]

# The validation questions (for choosing a recipe, e.g. `bench/demo_sweep.py`) draw on their own countries,
# opposites and words, so choosing on them neither sees the forgetting test nor the mixed-in training data.
VALIDATION_CAPITALS: list[tuple[str, str]] = [
    ("Latvia", "Riga"), ("Lithuania", "Vilnius"), ("Estonia", "Tallinn"), ("Slovakia", "Bratislava"),
    ("Slovenia", "Ljubljana"), ("Uruguay", "Montevideo"), ("Paraguay", "Asuncion"), ("Ecuador", "Quito"),
    ("Tunisia", "Tunis"), ("Senegal", "Dakar"), ("Uganda", "Kampala"), ("Zimbabwe", "Harare"),
    ("Jamaica", "Kingston"), ("Cambodia", "Phnom Penh"), ("Mongolia", "Ulaanbaatar"), ("Qatar", "Doha"),
    ("Jordan", "Amman"), ("Lebanon", "Beirut"),
]
VALIDATION_OPPOSITES: list[tuple[str, str]] = [
    ("above", "below"), ("sweet", "sour"), ("smooth", "rough"), ("wide", "narrow"), ("cheap", "expensive"),
    ("deep", "shallow"), ("arrive", "depart"), ("question", "answer"), ("start", "finish"), ("sharp", "dull"),
]
VALIDATION_WORDS = [
    "basket", "cherry", "desert", "falcon", "glacier", "hammer", "lantern", "meadow", "nickel", "otter",
    "parrot", "quilt", "ribbon", "spider", "tunnel", "walnut", "anchor", "blanket",
]

Row = dict[str, Any]


def _row(prompt: str, answer: str, task: str) -> Row:
    # `task` is kept out of the messages so the file is plain OpenAI messages JSONL (mixable into training).
    return {"messages": [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}], "_task": task}


def _arith(rng: random.Random, _pool: Any) -> Row:
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        val = a * b
    else:
        a, b = rng.randint(10, 99), rng.randint(1, 99)
        if op == "-" and b > a:
            a, b = b, a
        val = a + b if op == "+" else a - b
    return _row(f"What is {a} {op} {b}? Reply with the number only.", str(val), "arithmetic")


def _capital(rng: random.Random, pool: list[tuple[str, str]]) -> Row:
    country, city = rng.choice(pool)
    ask = rng.choice(["What is the capital of {}?", "Name the capital city of {}.", "Which city is the capital of {}?"])
    return _row(ask.format(country) + " Reply with the city name only.", city, "capitals")


def _opposite(rng: random.Random, pool: list[tuple[str, str]]) -> Row:
    w, o = rng.choice(pool)
    ask = rng.choice(["What is the opposite of the word '{}'?", "Give the antonym of '{}'.", "Which word means the opposite of '{}'?"])
    return _row(ask.format(w) + " Reply with one word.", o, "opposites")


def _upper(rng: random.Random, pool: list[str]) -> Row:
    words = rng.sample(pool, 3)
    return _row(f"Rewrite this in uppercase letters: {' '.join(words)}", " ".join(words).upper(), "uppercase")


def _sort(rng: random.Random, pool: list[str]) -> Row:
    words = rng.sample(pool, 4)
    return _row(
        f"Sort these words alphabetically and list them separated by commas: {', '.join(words)}",
        ", ".join(sorted(words)),
        "sorting",
    )


def _count(rng: random.Random, pool: list[str]) -> Row:
    n = rng.randint(2, 7)
    words = [rng.choice(pool) for _ in range(n)]
    return _row(f"How many words are in this list: {' '.join(words)}? Reply with the number only.", str(n), "counting")


def _split(items: list[Any], every: int = 4) -> tuple[list[Any], list[Any]]:
    """(train, eval): every `every`-th item goes to eval, so the two pools are disjoint and stable."""
    return [x for i, x in enumerate(items) if i % every != 0], [x for i, x in enumerate(items) if i % every == 0]


def build(n_train: int = 300, n_eval: int = 60, seed: int = SEED) -> tuple[list[Row], list[Row]]:
    cap_tr, cap_ev = _split(CAPITALS)
    opp_tr, opp_ev = _split(OPPOSITES, every=3)
    w_tr, w_ev = _split(WORDS, every=3)
    tasks: list[tuple[Callable[[random.Random, Any], Row], Any, Any]] = [
        (_arith, None, None), (_capital, cap_tr, cap_ev), (_opposite, opp_tr, opp_ev),
        (_upper, w_tr, w_ev), (_sort, w_tr, w_ev), (_count, w_tr, w_ev),
    ]
    rng = random.Random(seed)

    def make(n: int, which: int, avoid: set[str]) -> list[Row]:
        rows: list[Row] = []
        seen = set(avoid)
        tries = 0
        while len(rows) < n:
            fn, tr, ev = tasks[len(rows) % len(tasks)]  # round-robin keeps tasks balanced
            row = fn(rng, (tr, ev)[which])
            key = row["messages"][0]["content"]
            tries += 1
            if key in seen and tries < 100 * n:
                continue
            seen.add(key)
            rows.append(row)
        return rows

    ev = make(n_eval, 1, set())
    tr = make(n_train, 0, {r["messages"][0]["content"] for r in ev})
    return tr, ev


def build_validation(n: int = 60, seed: int = SEED + 1) -> list[Row]:
    """Validation questions: the same six tasks over their own countries, opposites and words, and no prompt of
    the train or eval set (arithmetic shares the operand ranges)."""
    tr, ev = build()
    avoid = {r["messages"][0]["content"] for r in tr + ev}
    pools: list[tuple[Callable[[random.Random, Any], Row], Any]] = [
        (_arith, None), (_capital, VALIDATION_CAPITALS), (_opposite, VALIDATION_OPPOSITES),
        (_upper, VALIDATION_WORDS), (_sort, VALIDATION_WORDS), (_count, VALIDATION_WORDS),
    ]
    rng = random.Random(seed)
    rows: list[Row] = []
    while len(rows) < n:
        fn, pool = pools[len(rows) % len(pools)]
        row = fn(rng, pool)
        if row["messages"][0]["content"] not in avoid:
            avoid.add(row["messages"][0]["content"])
            rows.append(row)
    return rows


def write(out_dir: Path = GENERAL_DIR) -> tuple[Path, Path, Path]:
    tr, ev = build()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, rows in (("train.jsonl", tr), ("eval.jsonl", ev), ("validation.jsonl", build_validation())):
        p = out_dir / name
        p.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in rows), encoding="utf-8")
        paths.append(p)
    return paths[0], paths[1], paths[2]


def general_path(split: str = "train") -> Path:
    """Path of the bundled general set: 'train' to mix into training (data.mix.path), 'eval' for forgetting,
    'validation' for choosing a recipe without looking at the forgetting test."""
    if split not in ("train", "eval", "validation"):
        raise ValueError("split must be 'train', 'eval' or 'validation'")
    return GENERAL_DIR / f"{split}.jsonl"


if __name__ == "__main__":  # pragma: no cover
    for path in write():
        print(path)
