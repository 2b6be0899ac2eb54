"""Scoring for the clinical-note -> JSON task: pure functions, no model, no I/O.

A model output earns three scores: `json_valid` (the whole output is one JSON object, allowing surrounding
whitespace and one ```json fence), `schema_ok` (that object validates against `JSON_SCHEMA`), and
`field_accuracy` (the fraction of the four fields equal to the reference: strings after normalising case,
whitespace and trailing punctuation, `icd10_codes` as a set). Per-field 0/1 scores come along so a report can
show which field a model gets wrong.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from typing import Any

from jsonschema import Draft202012Validator

from tunelab.demo.clinical import FIELDS, JSON_SCHEMA

_VALIDATOR = Draft202012Validator(JSON_SCHEMA)
_FENCE = re.compile(r"^```(?:json)?[ \t]*\n?(.*?)\n?[ \t]*```$", re.DOTALL | re.IGNORECASE)
_TRAILING = " \t\n.,;:"


def parse_json_output(text: str) -> dict[str, Any] | None:
    """The JSON object a model produced, or None when the output is anything but exactly one object."""
    body = text.strip()
    fenced = _FENCE.match(body)
    if fenced:
        body = fenced.group(1).strip()
    try:
        obj = json.loads(body)  # rejects trailing text ("Extra data"), so prose around the object fails
    except (json.JSONDecodeError, RecursionError):
        return None
    return obj if isinstance(obj, dict) else None


def normalise_text(value: str) -> str:
    """Case-fold, collapse whitespace, drop trailing punctuation: "Plan  X." == "plan x"."""
    return " ".join(value.split()).lower().rstrip(_TRAILING)


def _field_correct(name: str, got: Any, want: Any) -> bool:
    if name == "icd10_codes":
        if not isinstance(got, list) or not all(isinstance(c, str) for c in got):
            return False
        return {c.strip().upper() for c in got} == {c.strip().upper() for c in want}
    return isinstance(got, str) and normalise_text(got) == normalise_text(want)


def score_output(output: str, reference: dict[str, Any]) -> dict[str, float]:
    """Scores of one model output against its reference JSON; every value is in [0, 1]."""
    parsed = parse_json_output(output)
    scores: dict[str, float] = {"json_valid": 0.0, "schema_ok": 0.0, "field_accuracy": 0.0}
    scores.update({f"field_{name}": 0.0 for name in FIELDS})
    if parsed is None:
        return scores
    scores["json_valid"] = 1.0
    scores["schema_ok"] = float(_VALIDATOR.is_valid(parsed))
    for name in FIELDS:
        scores[f"field_{name}"] = float(name in parsed and _field_correct(name, parsed[name], reference[name]))
    scores["field_accuracy"] = sum(scores[f"field_{name}"] for name in FIELDS) / len(FIELDS)
    return scores


def aggregate(scores: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of every score over a set of outputs, plus `n`, the number of outputs."""
    if not scores:
        raise ValueError("aggregate() needs at least one score")
    keys = scores[0].keys()
    out = {k: sum(s[k] for s in scores) / len(scores) for k in keys}
    out["n"] = float(len(scores))
    return out
