"""The bundled clinical-note -> JSON demo task: generator determinism and its recorded seed, the three disjoint
vocabulary pools (train A, validation C, test B), the shipped files passing the contamination check, and the
task's scores as `tunelab eval` computes them for the demo (worked out by hand)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tunelab.data.readers import parse_file
from tunelab.data.toolkit.contamination import contamination
from tunelab.demo import clinical
from tunelab.demo.clinical import (
    FIELDS,
    FORMAT_INSTRUCTIONS,
    JSON_SCHEMA,
    POOLS,
    SEED,
    SIZES,
    SPLITS,
    build_splits,
    bundled_path,
    generate,
    load_examples,
    prompt_messages,
)
from tunelab.demo.vocab import POOL_A, POOL_B, POOL_C
from tunelab.eval import metrics as M
from tunelab.eval.general import general_path

REF = {
    "chief_complaint": "R ear pain",
    "assessment": "otitis media, right ear; essential hypertension",
    "plan": "amoxicillin 500 mg PO t.i.d. x10d, f/u 2 wks",
    "icd10_codes": ["H66.91", "I10"],
}


def _rows(split: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in bundled_path(split).read_text(encoding="utf-8").splitlines()]


def _note(row: dict[str, Any]) -> str:
    return str(row["messages"][0]["content"])


def _target(row: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = json.loads(row["messages"][1]["content"])
    return out


def _code_in(code: str, text: str) -> bool:
    # A code counts as present only as a whole token: "E78.5" must not match inside "E78.50".
    return re.search(rf"(?<![\w.]){re.escape(code)}(?![\w]|\.\w)", text) is not None


# ---------------------------------------------------------------- generator


def test_regenerating_with_the_recorded_seed_reproduces_shipped_files(tmp_path: Path) -> None:
    recorded = json.loads((bundled_path("train").parent / "generator.json").read_text(encoding="utf-8"))
    assert recorded["seed"] == SEED == 0
    assert recorded["splits"] == {s: {"examples": SIZES[s], "pool": POOLS[s].name} for s in SPLITS}
    paths = generate(tmp_path, seed=recorded["seed"])
    assert set(paths) == set(SPLITS)
    for split in SPLITS:
        assert paths[split].read_bytes() == bundled_path(split).read_bytes(), split
    assert (tmp_path / "generator.json").read_bytes() == (bundled_path("train").parent / "generator.json").read_bytes()


def test_seed_changes_the_data_and_same_seed_repeats_it() -> None:
    assert build_splits(7) == build_splits(7)
    assert build_splits(7)["train"] != build_splits(8)["train"]


def test_cli_writes_the_same_files_as_generate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    clinical.main(["--out", str(tmp_path / "cli"), "--seed", "3"])
    generate(tmp_path / "lib", seed=3)
    for split in SPLITS:
        assert (tmp_path / "cli" / f"{split}.jsonl").read_bytes() == (tmp_path / "lib" / f"{split}.jsonl").read_bytes()
    assert "400 examples" in capsys.readouterr().out


def test_sizes_and_no_example_twice() -> None:
    notes = []
    for split in SPLITS:
        rows = _rows(split)
        assert len(rows) == SIZES[split]
        notes += [_note(r) for r in rows]
    assert SIZES == {"train": 400, "validation": 40, "test": 60}
    assert len(notes) == len(set(notes)), "a note appears twice (within or across splits)"


@pytest.mark.parametrize("split", SPLITS)
def test_shipped_files_parse_without_errors(split: str) -> None:
    res = parse_file(bundled_path(split), expect="conversation")
    assert res.format == "messages"
    assert res.errors == []
    assert len(res.records) == SIZES[split]
    for rec in res.records:
        assert [m.role for m in rec.messages] == ["user", "assistant"]


@pytest.mark.parametrize("split", SPLITS)
def test_references_validate_and_are_spans_of_the_note(split: str) -> None:
    validator = Draft202012Validator(JSON_SCHEMA)
    for row in _rows(split):
        note, target = _note(row), _target(row)
        assert list(target) == list(FIELDS)  # keys in the documented order
        assert not list(validator.iter_errors(target)), target
        assert 1 <= len(target["icd10_codes"]) <= 2
        # Every value is copied from the note: the task is extraction, not medical knowledge.
        assert target["chief_complaint"] in note
        assert target["plan"] in note
        for name in target["assessment"].split("; "):
            assert name in note
        for code in target["icd10_codes"]:
            assert _code_in(code, note)
        assert len(note.split()) <= 70


HELD_OUT = [("validation", POOL_C), ("test", POOL_B)]


@pytest.mark.parametrize(("split", "pool"), HELD_OUT)
def test_held_out_vocabulary_never_appears_in_the_other_splits(split: str, pool: Any) -> None:
    others = [s for s in SPLITS if s != split]
    seen_text = "\n".join(_note(r) + "\n" + r["messages"][1]["content"] for s in others for r in _rows(s))
    targets = [_target(r) for r in _rows(split)]
    for t in targets:
        assert t["chief_complaint"].lower() not in seen_text.lower(), t["chief_complaint"]
        assert t["plan"] not in seen_text, t["plan"]
        for name in t["assessment"].split("; "):
            assert name not in seen_text, name
        for code in t["icd10_codes"]:
            assert not _code_in(code, seen_text), code
    # Each split exercises the whole of its pool's diagnoses.
    assert {c for t in targets for c in t["icd10_codes"]} == {c.code for c in pool.cases}
    train_codes = {c for r in _rows("train") for c in _target(r)["icd10_codes"]}
    assert train_codes == {c.code for c in POOL_A.cases}


@pytest.mark.parametrize(("split", "pool"), HELD_OUT)
def test_held_out_templates_never_appear_in_the_other_splits(split: str, pool: Any) -> None:
    other_notes = "\n".join(_note(r) for s in SPLITS if s != split for r in _rows(s))
    own_notes = "\n".join(_note(r) for r in _rows(split))
    for other in (POOL_A, POOL_B, POOL_C):
        if other is not pool:
            assert not set(other.templates) & set(pool.templates), other.name
    for template in pool.templates:
        # The longest fixed text of each held-out template is its fingerprint: present in its split only.
        fixed = max(re.split(r"\{\w+\}", template), key=len).strip()
        assert len(fixed) >= 3, template
        assert fixed in own_notes, f"pool-{pool.name} template never used: {template!r}"
        assert fixed not in other_notes, f"pool-{pool.name} template text {fixed!r} leaked into another split"


@pytest.mark.parametrize(("a", "b"), [(POOL_A, POOL_B), (POOL_A, POOL_C), (POOL_B, POOL_C)])
def test_pools_share_no_vocabulary(a: Any, b: Any) -> None:
    assert not {c.code for c in a.cases} & {c.code for c in b.cases}
    assert not {c.diagnosis for c in a.cases} & {c.diagnosis for c in b.cases}
    assert not {x for c in a.cases for x in c.complaints} & {x for c in b.cases for x in c.complaints}
    assert not {x for c in a.cases for x in c.plans} & {x for c in b.cases for x in c.plans}
    assert not set(a.code_styles) & set(b.code_styles)


@pytest.mark.parametrize(
    ("train", "held_out"),
    [
        (bundled_path("train"), bundled_path("validation")),
        (bundled_path("train"), bundled_path("test")),
        (bundled_path("validation"), bundled_path("test")),
        (general_path("train"), general_path("eval")),
        (general_path("train"), general_path("validation")),
        (general_path("validation"), general_path("eval")),
    ],
    ids=["train~validation", "train~test", "validation~test", "general-train~eval", "general-train~validation",
         "general-validation~eval"],
)
def test_shipped_splits_pass_the_contamination_check(train: Path, held_out: Path) -> None:
    # What `tunelab data contamination TRAIN EVAL` runs, with its defaults, on the shipped files themselves.
    report, _ = contamination(train, held_out)
    assert report.eval_rows > 0 and report.train_rows > 0
    assert report.leaks == [], report.summary()
    assert report.same_generator == []


def test_format_instructions_and_prompt_messages() -> None:
    example = FORMAT_INSTRUCTIONS.split("Example reply: ", 1)[1]
    assert M.schema_conforms(example, JSON_SCHEMA) == 1.0
    for key in FIELDS:
        assert f'"{key}"' in FORMAT_INSTRUCTIONS
    # The worked example comes from neither pool, so it gives the base model no test answers.
    for case in POOL_A.cases + POOL_B.cases:
        assert not _code_in(case.code, FORMAT_INSTRUCTIONS)
    note = "Pt c/o cough."
    assert prompt_messages(note, instructions=False) == [{"role": "user", "content": note}]
    assert prompt_messages(note, instructions=True)[0] == {"role": "system", "content": FORMAT_INSTRUCTIONS}


def test_load_examples_pairs_notes_with_references() -> None:
    pairs = load_examples(bundled_path("validation"))
    assert len(pairs) == 40
    note, ref = pairs[0]
    assert note == _note(_rows("validation")[0])
    assert ref == _target(_rows("validation")[0])


# ---------------------------------------------------------------- scoring


def score(output: str, lenient: bool = False) -> tuple[float, float, float | None]:
    """The demo's three task scores, as `tunelab eval` computes them with the demo's schema and fields."""
    ref = json.dumps(REF)
    return (M.json_valid(output, lenient), M.schema_conforms(output, JSON_SCHEMA, lenient),
            M.field_accuracy(output, ref, FIELDS, lenient))


def test_exact_reference_scores_one() -> None:
    assert score(json.dumps(REF)) == (1.0, 1.0, 1.0)
    assert M.field_matches(json.dumps(REF), json.dumps(REF), FIELDS) == dict.fromkeys(FIELDS, True)


@pytest.mark.parametrize("wrap", ["```json\n{}\n```", "```\n{}\n```", "\n```JSON\n{}```\n"])
def test_one_fence_is_invalid_strictly_and_tolerated_leniently(wrap: str) -> None:
    out = wrap.replace("{}", json.dumps(REF, indent=2))
    assert score(out) == (0.0, 0.0, 0.0)  # the demo's default: strict JSON, as an API consumer would parse it
    assert score(out, lenient=True) == (1.0, 1.0, 1.0)
    assert score("  " + json.dumps(REF, indent=2) + "\n") == (1.0, 1.0, 1.0)  # surrounding whitespace is fine


@pytest.mark.parametrize(
    "out",
    [
        "Here is the JSON: " + json.dumps(REF),  # prose before
        json.dumps(REF) + "\nLet me know if you need more.",  # prose after
        json.dumps(REF) + json.dumps(REF),  # two objects
        json.dumps(REF)[:-1],  # truncated
        "",
        "{'chief_complaint': 'R ear pain'}",  # Python dict, not JSON
        "```json\n" + json.dumps(REF),  # unclosed fence
    ],
)
def test_anything_but_one_json_value_is_invalid(out: str) -> None:
    assert score(out) == (0.0, 0.0, 0.0)
    assert score(out, lenient=True) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize("out", [json.dumps([REF]), '"just a string"'])
def test_json_that_is_not_an_object_fails_schema_and_fields(out: str) -> None:
    assert score(out) == (1.0, 0.0, 0.0)


def test_wrong_types_fail_schema_and_those_fields() -> None:
    # icd10_codes as a string and plan as a list: valid JSON, invalid schema, 2 of 4 fields right.
    out = json.dumps(dict(REF, icd10_codes="H66.91, I10", plan=[REF["plan"]]))
    assert score(out) == (1.0, 0.0, 0.5)
    m = M.field_matches(out, json.dumps(REF), FIELDS)
    assert m == {"chief_complaint": True, "assessment": True, "plan": False, "icd10_codes": False}


def test_missing_and_extra_keys_fail_schema() -> None:
    missing = {k: v for k, v in REF.items() if k != "plan"}
    assert score(json.dumps(missing)) == (1.0, 0.0, 0.75)
    assert score(json.dumps(dict(REF, notes="none"))) == (1.0, 0.0, 1.0)
    assert score(json.dumps(dict(REF, icd10_codes=["H66.91", "hypertension"])))[1] == 0.0
    assert score(json.dumps(dict(REF, icd10_codes=[])))[1] == 0.0


def test_partial_field_matches() -> None:
    out = {
        "chief_complaint": "  r EAR   pain.",  # case, whitespace, trailing period: still right
        "assessment": "otitis media, right ear",  # missing the second diagnosis: wrong
        "plan": REF["plan"] + ";",  # trailing punctuation: still right
        "icd10_codes": ["I10"],  # missing H66.91: wrong
    }
    assert score(json.dumps(out)) == (1.0, 1.0, 0.5)
    assert M.field_matches(json.dumps(out), json.dumps(REF), FIELDS) == {
        "chief_complaint": True, "assessment": False, "plan": True, "icd10_codes": False}
    # Codes compare as a set: order does not matter, a wrong extra code does.
    assert score(json.dumps(dict(REF, icd10_codes=["I10", "H66.91"])))[2] == 1.0
    assert score(json.dumps(dict(REF, icd10_codes=["I10", "H66.91", "E11.9"])))[2] == 0.75


def test_aggregate_means_by_hand() -> None:
    outs = [json.dumps(REF), json.dumps(dict(REF, assessment="x", plan="y")), "not json"]
    rows = [score(o) for o in outs]
    assert M.mean([r[0] for r in rows]) == pytest.approx(2 / 3)
    assert M.mean([r[1] for r in rows]) == pytest.approx(2 / 3)
    assert M.mean([r[2] for r in rows]) == pytest.approx((1.0 + 0.5 + 0.0) / 3)
