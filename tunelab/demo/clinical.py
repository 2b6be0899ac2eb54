"""Deterministic generator of the demo's behaviour task: a short clinical note in, strict JSON out.

Each example is an OpenAI `messages` record: the user turn holds only the note (no instructions), the assistant
turn the single-line JSON `{"chief_complaint", "assessment", "plan", "icd10_codes"}`. Every value is a span
copied from the note (complaint without its duration; diagnosis names without codes, joined by "; "; the plan
phrase; the codes in order of appearance), so the task is format and extraction behaviour, not medical knowledge.

Train comes from vocabulary pool A, validation from pool C, test from pool B (`vocab.py`): neither held-out
split shares a template, diagnosis, code, complaint or plan phrase with training (or with each other), so both
pass `tunelab data contamination` against the training file and validation predicts test. Each split draws
from its own random stream (seeded by the seed and the split's name), so editing one pool leaves the other
splits as they were. The shipped files under `tunelab/resources/clinical/` are exactly `generate(dir, seed=SEED)`,
and `generator.json` beside them records the seed and the command; regenerate them with
`python -m tunelab.demo.clinical --out tunelab/resources/clinical --seed 0`.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path
from typing import Any

from tunelab.data.readers import read_conversations, write_jsonl
from tunelab.demo.vocab import PMH, POOL_A, POOL_B, POOL_C, Case, Pool
from tunelab.errors import TunelabError

SPLITS = ("train", "validation", "test")
SEED = 0  # the seed of the shipped files (also recorded in generator.json beside them)
POOLS = {"train": POOL_A, "validation": POOL_C, "test": POOL_B}
SIZES = {"train": 400, "validation": 40, "test": 60}
FIELDS = ("chief_complaint", "assessment", "plan", "icd10_codes")
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "resources" / "clinical"

# ICD-10-CM shape: letter, digit, alphanumeric, then an optional dot and 1-4 alphanumerics (I10, E11.9, S93.401A).
ICD10_PATTERN = r"^[A-Z][0-9][0-9A-Z](\.[0-9A-Z]{1,4})?$"

JSON_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {
        "chief_complaint": {"type": "string", "minLength": 1},
        "assessment": {"type": "string", "minLength": 1},
        "plan": {"type": "string", "minLength": 1},
        "icd10_codes": {
            "type": "array",
            "items": {"type": "string", "pattern": ICD10_PATTERN},
            "minItems": 1,
            "uniqueItems": True,
        },
    },
    "required": list(FIELDS),
    "additionalProperties": False,
}

_EXAMPLE_NOTE = (
    "37F c/o L wrist pain x2d after a fall. Dx: sprain of left wrist, initial encounter (S63.502A). "
    "Plan: wrist splint, ibuprofen 400 mg PO q8h PRN."
)
_EXAMPLE_JSON = json.dumps(
    {
        "chief_complaint": "L wrist pain",
        "assessment": "sprain of left wrist, initial encounter",
        "plan": "wrist splint, ibuprofen 400 mg PO q8h PRN",
        "icd10_codes": ["S63.502A"],
    }
)

# The system prompt that gives the *base* model its best chance in the before/after comparison; the fine-tuned
# model is evaluated without it. Its worked example comes from neither pool.
FORMAT_INSTRUCTIONS = f"""You convert a clinical note into JSON. Reply with exactly one JSON object and nothing else \
(no prose, no code fence). It must have exactly these four keys, in this order:
- "chief_complaint": string, the patient's presenting complaint as written in the note, without its duration
- "assessment": string, the diagnosis name(s) as written, without ICD-10 codes; separate two diagnoses with "; "
- "plan": string, the treatment plan as written in the note
- "icd10_codes": list of strings, every ICD-10 code in the note, in order of appearance
Example note: {_EXAMPLE_NOTE}
Example reply: {_EXAMPLE_JSON}"""


_SEXES = (("M", "male", "man"), ("F", "female", "woman"))


def _capitalise(sentence: str) -> str:
    return sentence[:1].upper() + sentence[1:]


def _fill(template: str, **values: str) -> str:
    # str.format ignores unused keyword arguments, so every template can take the full set of slots.
    return template.format(**values)


def make_example(rng: random.Random, pool: Pool, case: Case | None = None) -> tuple[str, dict[str, Any]]:
    """One (note, target) pair drawn from `pool` (about `case` if given); all randomness comes from `rng`."""
    case = case or rng.choice(pool.cases)
    s, sex, person = rng.choice(_SEXES) if case.sex is None else next(x for x in _SEXES if x[0] == case.sex)
    diagnoses: list[Case] = [case]
    comorbid = [c for c in pool.cases if c.chronic and c.code != case.code and c.sex in (None, s)]
    if rng.random() < 0.3:
        diagnoses.append(rng.choice(comorbid))
    cc = rng.choice(case.complaints)
    plan = rng.choice(case.plans)
    nums = {"n": str(rng.randint(2, 10)), "w": str(rng.randint(2, 6))}
    if rng.random() < 0.3:
        plan += rng.choice(pool.follow_ups).format(**nums)

    demo = rng.choice(pool.demographics).format(age=rng.randint(18, 89), s=s, sex=sex, person=person)
    dur = rng.choice(pool.durations).format(**nums)
    style = rng.choice(pool.code_styles)
    dx = rng.choice(pool.dx_joiners).join(style.format(name=d.diagnosis, code=d.code) for d in diagnoses)
    slots = {"demo": demo, "cc": cc, "dur": dur, "dx": dx, "plan": plan}
    extra_values = {
        "sbp": str(rng.randint(108, 168)),
        "dbp": str(rng.randint(64, 98)),
        "hr": str(rng.randint(58, 108)),
        "pmh": rng.choice(PMH),
    }

    # A note about a febrile complaint must not also say the patient denies fever.
    extras = [e for e in pool.extras if "fever" not in e or "fever" not in cc]
    # Keep notes short (the demo trains on a CPU): two extras only when there is one diagnosis.
    n_extras = rng.choice((0, 0, 1, 1, 2) if len(diagnoses) == 1 else (0, 1))
    if rng.random() < 0.15:
        sentences = [_fill(rng.choice(pool.one_liners), **slots)]
        if rng.random() < 0.5:
            sentences.append(rng.choice(extras).format(**extra_values))
    else:
        sentences = [_fill(rng.choice(pool.openers), **slots)]
        sentences += [e.format(**extra_values) for e in rng.sample(extras, n_extras)]
        sentences.append(_fill(rng.choice(pool.dx_sentences), **slots))
        sentences.append(_fill(rng.choice(pool.plan_sentences), **slots))
    # A plan ending in an abbreviation ("b.i.d.") already ends the sentence.
    note = " ".join(_capitalise(x.replace("..", ".")) for x in sentences)
    target = {
        "chief_complaint": cc,
        "assessment": "; ".join(d.diagnosis for d in diagnoses),
        "plan": plan,
        "icd10_codes": [d.code for d in diagnoses],
    }
    return note, target


def to_record(note: str, target: dict[str, Any]) -> dict[str, Any]:
    return {
        "messages": [
            {"role": "user", "content": note},
            {"role": "assistant", "content": json.dumps(target, ensure_ascii=False)},
        ]
    }


def _draw(rng: random.Random, pool: Pool, n: int, seen: set[str]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    deck: list[Case] = []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 100 * n:  # the pools hold far more combinations than this; guards an edited vocab
            raise TunelabError(f"pool {pool.name} cannot produce {n} distinct notes")
        if not deck:  # deal the cases round-robin in shuffled order, so every diagnosis is covered evenly
            deck = list(pool.cases)
            rng.shuffle(deck)
        note, target = make_example(rng, pool, deck.pop())
        if note in seen:  # no example twice, and none shared between train and validation
            continue
        seen.add(note)
        rows.append(to_record(note, target))
    return rows


def build_splits(seed: int = SEED) -> dict[str, list[dict[str, Any]]]:
    """The three splits as lists of `messages` records; the same seed always gives the same records."""
    # A string seed is hashed with SHA-512 by `random`, so the streams do not depend on PYTHONHASHSEED.
    return {split: _draw(random.Random(f"{seed}:{split}"), POOLS[split], SIZES[split], set()) for split in SPLITS}


def generator_record(seed: int) -> dict[str, Any]:
    """What `generator.json` records beside the files: enough to regenerate them exactly."""
    return {
        "generator": "tunelab.demo.clinical",
        "seed": seed,
        "command": f"python -m tunelab.demo.clinical --out tunelab/resources/clinical --seed {seed}",
        "splits": {split: {"examples": SIZES[split], "pool": POOLS[split].name} for split in SPLITS},
    }


def generate(out_dir: str | Path, seed: int = SEED) -> dict[str, Path]:
    """Write train/validation/test JSONL and generator.json into `out_dir` (each file atomically); returns the
    split paths."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for split, rows in build_splits(seed).items():
        paths[split] = out / f"{split}.jsonl"
        write_jsonl(paths[split], rows)
    tmp = out / "generator.json.tmp"
    tmp.write_text(json.dumps(generator_record(seed), indent=1) + "\n", encoding="utf-8")
    tmp.replace(out / "generator.json")
    return paths


def bundled_path(split: str) -> Path:
    """Path of a shipped split (train, validation or test)."""
    if split not in SPLITS:
        raise TunelabError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}", 2)
    return BUNDLED_DIR / f"{split}.jsonl"


def load_examples(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(note, reference JSON) pairs from a split file, for evaluation."""
    out: list[tuple[str, dict[str, Any]]] = []
    for conv in read_conversations(path):
        note = next(m.content for m in conv.messages if m.role == "user")
        out.append((note, json.loads(conv.completion)))
    return out


def prompt_messages(note: str, *, instructions: bool) -> list[dict[str, str]]:
    """Chat messages asking for the JSON of `note`: with FORMAT_INSTRUCTIONS as the system prompt (how the base
    model is prompted) or the bare note (what the fine-tuned model was trained on)."""
    messages = [{"role": "user", "content": note}]
    if instructions:
        messages.insert(0, {"role": "system", "content": FORMAT_INSTRUCTIONS})
    return messages


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Generate the synthetic clinical-note -> JSON demo dataset.")
    parser.add_argument("--out", required=True, help="directory to write train/validation/test.jsonl into")
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)
    for split, path in generate(args.out, args.seed).items():
        print(f"{split:<10} {SIZES[split]:>4} examples -> {path}")


if __name__ == "__main__":
    main()
