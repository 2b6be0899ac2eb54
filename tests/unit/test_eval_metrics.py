"""Every evaluation metric on hand-made inputs whose right answer is worked out in the test."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tunelab.errors import ConfigError
from tunelab.eval import metrics as M
from tunelab.eval.config import EvalConfig, eval_config_from_dict, load_eval_config

SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "codes": {"type": "array", "items": {"type": "string"}}},
    "required": ["name", "codes"],
    "additionalProperties": False,
}


def test_exact_match_ignores_only_whitespace() -> None:
    assert M.exact_match("  hello   world\n", "hello world") == 1.0
    assert M.exact_match("Hello world", "hello world") == 0.0
    assert M.exact_match("hello world.", "hello world") == 0.0


def test_json_validity_strict_and_lenient() -> None:
    assert M.json_valid(' {"a": 1} ') == 1.0
    assert M.json_valid('{"a": 1} trailing') == 0.0  # prose after the object is not strict JSON
    assert M.json_valid("{'a': 1}") == 0.0
    fenced = '```json\n{"a": 1}\n```'
    assert M.json_valid(fenced) == 0.0
    assert M.json_valid(fenced, lenient=True) == 1.0


def test_schema_conformance() -> None:
    assert M.schema_conforms('{"name": "x", "codes": ["A1"]}', SCHEMA) == 1.0
    assert M.schema_conforms('{"name": "x"}', SCHEMA) == 0.0  # missing required field
    assert M.schema_conforms('{"name": "x", "codes": [1]}', SCHEMA) == 0.0  # wrong item type
    assert M.schema_conforms('{"name": "x", "codes": [], "extra": 1}', SCHEMA) == 0.0
    assert M.schema_conforms("not json", SCHEMA) == 0.0


def test_invalid_schema_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a valid JSON schema"):
        M.check_schema({"type": "no-such-type"})


def test_field_accuracy() -> None:
    ref = json.dumps({"name": "Chest pain", "codes": ["R07.9", "I10"], "plan": "rest"})
    # name matches after case/whitespace/trailing-dot normalisation; codes match as a set; plan differs.
    out = json.dumps({"name": "chest  PAIN.", "codes": ["I10", "R07.9"], "plan": "surgery"})
    assert M.field_matches(out, ref) == {"name": True, "codes": True, "plan": False}
    assert M.field_accuracy(out, ref) == pytest.approx(2 / 3)
    assert M.field_accuracy(out, ref, fields=["name", "codes"]) == 1.0
    assert M.field_accuracy(json.dumps({"name": "chest pain"}), ref) == pytest.approx(1 / 3)  # missing fields wrong
    assert M.field_accuracy("garbage", ref) == 0.0
    assert M.field_accuracy("anything", "plain text reference") is None  # does not apply


def test_rouge_l_by_hand() -> None:
    # LCS of "the cat sat" and "the cat was sat" is 3 tokens: P = 3/4, R = 3/3, F = 2PR/(P+R) = 6/7.
    assert M.rouge_l("the cat was sat", "the cat sat") == pytest.approx(6 / 7)
    assert M.rouge_l("same words here", "same words here") == pytest.approx(1.0)
    assert M.rouge_l("nothing shared", "entirely different") == 0.0


def test_chrf_and_bleu() -> None:
    assert M.chrf("the quick brown fox", "the quick brown fox") == pytest.approx(100.0)
    assert M.bleu("the quick brown fox jumps", "the quick brown fox jumps") == pytest.approx(100.0)
    partial = M.chrf("the quick brown cat", "the quick brown fox")
    assert 0 < partial < 100
    assert M.chrf("zzzz", "the quick brown fox") < partial
    outs, refs = ["a b c d e", "f g h i j"], ["a b c d e", "f g h i x"]
    corpus = M.corpus_bleu(outs, refs)
    assert 0 < corpus < 100
    assert M.corpus_chrf(refs, refs) == pytest.approx(100.0)


def test_perplexity() -> None:
    assert M.perplexity(0.0) == 1.0
    assert M.perplexity(math.log(7.0)) == pytest.approx(7.0)
    assert M.perplexity(1e4) == math.inf
    assert math.isnan(M.perplexity(math.nan))


def test_contains_answer() -> None:
    assert M.contains_answer("The answer is 42.", "42") == 1.0
    assert M.contains_answer("142", "42") == 0.0
    assert M.contains_answer("The capital is paris", "Paris") == 1.0  # case does not matter for names
    assert M.contains_answer("cat dog", "CAT DOG") == 0.0  # but it does for an uppercase rewrite
    assert M.contains_answer("CAT   DOG", "CAT DOG") == 1.0


def test_build_binds_configured_metrics() -> None:
    fns = M.build(["exact_match", "json_valid", "schema", "field_accuracy"], schema=SCHEMA)
    ref = '{"name": "x", "codes": ["A"]}'
    scores = {k: f("prompt", ref, ref) for k, f in fns.items()}
    assert scores == {"exact_match": 1.0, "json_valid": 1.0, "schema": 1.0, "field_accuracy": 1.0}
    with pytest.raises(ConfigError, match="unknown metric 'bleurt'"):
        M.build(["bleurt"])
    with pytest.raises(ConfigError, match="json_schema is not set"):
        M.build(["schema"])


def test_user_metric_from_file_and_module(tmp_path: Path) -> None:
    f = tmp_path / "my_metric.py"
    f.write_text("def length_ratio(prompt, output, reference):\n    return len(output) / max(len(reference), 1)\n")
    fn = M.load_user_metric(f"{f}:length_ratio")
    assert fn("p", "abcd", "ab") == 2.0
    assert M.user_metric_name(f"{f}:length_ratio") == "length_ratio"
    mod = M.load_user_metric("tunelab.eval.metrics:exact_match")  # module:function form
    assert mod("a", "a") == 1.0  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="not found"):
        M.load_user_metric(f"{tmp_path / 'missing.py'}:f")
    with pytest.raises(ConfigError, match="no function 'nope'"):
        M.load_user_metric(f"{f}:nope")
    with pytest.raises(ConfigError, match="cannot import module"):
        M.load_user_metric("no_such_module_xyz:f")


def test_eval_config_errors_name_the_key(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"eval\.metric: unknown key"):
        eval_config_from_dict({"metric": ["bleu"]})
    with pytest.raises(ConfigError, match=r"eval\.generation\.max_new_tokens"):
        eval_config_from_dict({"generation": {"max_new_tokens": 0}})
    p = tmp_path / "ev.yaml"
    p.write_text("model: {name: x}\ndata: {train: t.jsonl}\neval:\n  metrics: [bleu]\n  json_schema: schema.json\n")
    (tmp_path / "schema.json").write_text(json.dumps(SCHEMA))
    cfg = load_eval_config(p)
    assert cfg.metrics == ["bleu"]
    assert cfg.resolved_schema(tmp_path) == SCHEMA
    assert EvalConfig(json_schema="missing.json").model_copy() is not None
    with pytest.raises(ConfigError, match="not found"):
        EvalConfig(json_schema="missing.json").resolved_schema(tmp_path)
