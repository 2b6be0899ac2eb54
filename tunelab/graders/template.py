"""Grader templates: `{{sample.output_text}}`, `{{sample.output_json.FIELD}}`, `{{item.FIELD.SUB}}`.

A template is plain text with `{{ namespace.path }}` references (spaces allowed inside the braces). `sample`
is the model's output (`output_text`, `output_json` -- the output parsed as JSON, or null -- and
`output_tools`), `item` the data row's extra fields. Strings are inserted as they are, anything else as JSON.
No expressions, filters or loops: a template is not code.
"""

from __future__ import annotations

import json
import re
from typing import Any

_REF = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
_PATH = re.compile(r"^(sample|item)(\.[A-Za-z0-9_\-]+)*$")
SAMPLE_FIELDS = ("output_text", "output_json", "output_tools", "choices")


def references(template: str) -> list[tuple[str, ...]]:
    """The dotted paths a template reads, e.g. [("sample", "output_text"), ("item", "answer")]; ValueError
    names the first reference that is not `sample.*` or `item.*`."""
    out = []
    for m in _REF.finditer(template):
        ref = m.group(1)
        if not _PATH.match(ref):
            raise ValueError(f"{{{{{ref}}}}} is not a reference: use {{{{sample.output_text}}}}, "
                             "{{sample.output_json.FIELD}} or {{item.FIELD}}")
        parts = tuple(ref.split("."))
        if parts[0] == "sample" and len(parts) > 1 and parts[1] not in SAMPLE_FIELDS:
            raise ValueError(f"{{{{{ref}}}}}: a sample has {', '.join(SAMPLE_FIELDS)}")
        out.append(parts)
    return out


def lookup(ctx: dict[str, Any], path: tuple[str, ...]) -> tuple[bool, Any]:
    """(found, value) of a dotted path; list elements by index (`item.choices.0`)."""
    cur: Any = ctx
    for p in path:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            return False, None
    return True, cur


def render(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """The template with every reference filled in. A missing `item` field is a ValueError naming it (the
    job's data is checked for these before training); a missing part of `sample.output_json` renders empty
    (the model's output is what is being graded: not producing a field is a wrong answer, not an error)."""
    ctx = {"sample": sample, "item": item}

    def fill(m: re.Match[str]) -> str:
        path = tuple(m.group(1).split("."))
        found, value = lookup(ctx, path)
        if not found:
            if path[0] == "item":
                raise ValueError(f"the item has no field {'.'.join(path[1:])!r} (used as {{{{{m.group(1)}}}}})")
            return ""
        if value is None:
            return ""
        return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)

    return _REF.sub(fill, template)


def make_sample(output_text: str) -> dict[str, Any]:
    """OpenAI's `sample` object for a text completion."""
    try:
        output_json = json.loads(output_text)
    except ValueError:
        output_json = None
    return {"output_text": output_text, "output_json": output_json, "output_tools": [],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": output_text}}]}
