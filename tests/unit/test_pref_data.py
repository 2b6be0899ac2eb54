"""The bundled preference data is exactly what its generator makes, and it reads and validates cleanly;
GRPO's built-in reward functions score what they say they score."""

from __future__ import annotations

import json
from pathlib import Path

from tunelab.data.readers import read_records
from tunelab.data.records import Conversation, Preference
from tunelab.data.validate import validate_file
from tunelab.train import pref_data
from tunelab.train.grpo import json_schema_reward, json_valid, length_reward, regex_reward


def test_generator_reproduces_bundled_files(tmp_path: Path) -> None:
    for p in pref_data.write(tmp_path):
        assert p.read_bytes() == (pref_data.RESOURCES / p.name).read_bytes(), p.name


def test_bundled_files_read_and_validate() -> None:
    for name in ("pairs_train", "pairs_eval", "kto_train", "kto_eval", "prompts_train", "prompts_eval", "json_sft"):
        rep = validate_file(pref_data.resource(name))
        assert not rep.errors and not rep.warnings, (name, rep.issues[:3])
    pairs = read_records(pref_data.resource("pairs_train"))
    assert all(isinstance(p, Preference) for p in pairs)
    kto = [r for r in read_records(pref_data.resource("kto_train")) if isinstance(r, Conversation)]
    assert {r.label for r in kto} == {True, False}
    train = {p.key() for p in pairs if isinstance(p, Preference)}
    held = {p.key() for p in read_records(pref_data.resource("pairs_eval")) if isinstance(p, Preference)}
    assert not train & held  # held-out really is held out


def test_json_pairs_follow_their_rule() -> None:
    for line in pref_data.resource("pairs_train").read_text().splitlines():
        row = json.loads(line)
        if row["prompt"].startswith("Give the record as JSON"):
            assert json_valid(row["chosen"]) == 1.0 and json_valid(row["rejected"]) == 0.0


def test_reward_functions() -> None:
    assert json_valid('{"a": 1}') == 1.0 and json_valid(" [1, 2] ") == 1.0
    assert json_valid("{'a': 1}") == 0.0 and json_valid("3") == 0.0 and json_valid("[1") == 0.0
    schema = json_schema_reward({"type": "object", "required": ["age"], "properties": {"age": {"type": "integer"}}})
    assert schema('{"age": 3}') == 1.0 and schema('{"age": "3"}') == 0.0 and schema("nope") == 0.0
    assert regex_reward(r"^\[\d+\]$")("[12]") == 1.0 and regex_reward(r"^\[\d+\]$")("[12") == 0.0
    short = length_reward(10)
    assert short("x" * 10) == 1.0 and short("x" * 15) == 0.5 and short("x" * 30) == 0.0
