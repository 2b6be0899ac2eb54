"""OpenAI's grader types, each on values worked out by hand; the python sandbox's limits; invalid specs name
their field. No model: model graders run against a stub chat backend (and an http stub in the jobs tests)."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

import pytest

from tunelab.graders import GraderError, parse_grader
from tunelab.graders.formula import evaluate, parse_formula
from tunelab.graders.model import parse_label, parse_score
from tunelab.graders.runtime import Grader
from tunelab.graders.sandbox import network_isolation
from tunelab.graders.spec import item_fields
from tunelab.graders.template import make_sample, render
from tunelab.graders.text import similarity, string_check

OUT = "{{sample.output_text}}"


def grade(spec: dict[str, Any], outputs: list[str], items: list[dict[str, Any]] | None = None, **kw: Any) -> list[float]:
    with Grader(parse_grader(spec), **kw) as g:
        return g.grade(outputs, items or [{} for _ in outputs])[0]


def test_templates_fill_sample_and_item_fields() -> None:
    sample = make_sample('{"city": "Paris", "n": 3}')
    item = {"answer": "Paris", "meta": {"tags": ["a", "b"]}, "k": 2}
    assert render("{{ sample.output_json.city }}={{item.answer}}", sample, item) == "Paris=Paris"
    assert render("{{item.meta.tags.1}} {{item.k}} {{item.meta}}", sample, item) == 'b 2 {"tags": ["a", "b"]}'
    assert render("[{{sample.output_json.missing}}]", sample, item) == "[]"  # the output lacks it: a wrong answer
    with pytest.raises(ValueError, match="no field 'nope'"):
        render("{{item.nope}}", sample, item)
    assert item_fields(parse_grader({"type": "string_check", "name": "s", "input": OUT, "reference": "{{item.a.b}}",
                                     "operation": "eq"})) == {("a", "b")}


def test_string_check_operations() -> None:
    """eq/ne exact and case-sensitive; like: contains; ilike: contains ignoring case."""
    assert [string_check("Paris", "Paris", op) for op in ("eq", "ne", "like", "ilike")] == [1, 0, 1, 1]
    assert [string_check("It is paris.", "Paris", op) for op in ("eq", "ne", "like", "ilike")] == [0, 1, 0, 1]
    spec = {"type": "string_check", "name": "exact", "input": OUT, "reference": "{{item.answer}}", "operation": "eq"}
    assert grade(spec, ["7", "07", "7"], [{"answer": "7"}, {"answer": "7"}, {"answer": 7}]) == [1.0, 0.0, 1.0]


def test_text_similarity_metrics_by_hand() -> None:
    # fuzzy_match: SequenceMatcher ratio = 2 * 3 matching chars / 8 chars = 0.75.
    assert similarity("abcd", "abce", "fuzzy_match") == pytest.approx(0.75)
    # rouge_1: 2 of 3 unigrams shared each way -> P = R = F = 2/3; rouge_2: 1 of 2 bigrams ("a b") -> 0.5.
    assert similarity("a b c", "a b d", "rouge_1") == pytest.approx(2 / 3)
    assert similarity("a b c", "a b d", "rouge_2") == pytest.approx(0.5)
    # rouge_l: the longest common subsequence "a c" of "a b c" and "a c d" is 2 of 3 -> 2/3.
    assert similarity("a b c", "a c d", "rouge_l") == pytest.approx(2 / 3)
    for metric in ("bleu", "gleu", "meteor"):
        assert similarity("the cat sat on the mat", "the cat sat on the mat", metric) == pytest.approx(1.0, abs=0.01)
        assert similarity("dog", "the cat sat on the mat", metric) == pytest.approx(0.0, abs=0.01)
    # meteor matches stems without WordNet: "cats" ~ "cat" scores far above an unrelated word.
    assert similarity("the cats sat", "the cat sat", "meteor") > similarity("the dogs sat", "the cat sat", "meteor")
    spec = {"type": "text_similarity", "name": "sim", "input": OUT, "reference": "{{item.ref}}",
            "evaluation_metric": "fuzzy_match", "pass_threshold": 0.5}
    assert grade(spec, ["abcd"], [{"ref": "abce"}]) == [pytest.approx(0.75)]


def test_multi_formula_and_its_whitelist() -> None:
    """0.5 * exact + 0.5 * sim^2 with sim = 0.75 (fuzzy abcd/abce): 0.5 * 0 + 0.5 * 0.5625 = 0.28125; ^ is a
    power with a power's precedence."""
    spec = {"type": "multi", "name": "m", "calculate_output": "0.5 * exact + 0.5 * sim ^ 2", "graders": {
        "exact": {"type": "string_check", "name": "e", "input": OUT, "reference": "{{item.r}}", "operation": "eq"},
        "sim": {"type": "text_similarity", "name": "s", "input": OUT, "reference": "{{item.r}}",
                "evaluation_metric": "fuzzy_match"}}}
    with Grader(parse_grader(spec)) as g:
        scores, parts = g.grade(["abcd", "abce"], [{"r": "abce"}, {"r": "abce"}])
    assert scores == [pytest.approx(0.28125), pytest.approx(1.0)]
    assert parts == {"exact": [0.0, 1.0], "sim": [pytest.approx(0.75), 1.0]}
    tree = parse_formula("max(a, b) - min(a, 2) + floor(2.7) + sqrt(4) + abs(-1)", {"a", "b"})
    assert evaluate(tree, {"a": 1.0, "b": 3.0}) == 3 - 1 + 2 + 2 + 1
    for bad, why in [("__import__('os')", "only the functions"), ("a.real", "not allowed"), ("c + 1", "not one of"),
                     ("a if b else 1", "not allowed"), ("'x'", "not allowed"), ("a and b", "not allowed")]:
        with pytest.raises(ValueError, match=why):
            parse_formula(bad, {"a", "b"})


def test_model_graders_with_a_stub_backend() -> None:
    """score_model: the answer's number, clipped to range; label_model: 1 for a passing label, else 0. The
    rendered prompt carries the sample and item, and the instruction is appended."""
    seen: list[Any] = []

    def chat(model: str, batch: list[list[dict[str, str]]], sp: Any) -> list[str]:
        seen.append((model, batch))
        return [m[0]["content"].split("|")[1] for m in batch]

    score = {"type": "score_model", "name": "judge", "model": "tiny-llama", "range": [0, 10],
             "input": [{"role": "user", "content": "Q {{item.q}}|{{sample.output_text}}"}]}
    assert grade(score, ["7", "score: 12", '{"result": 2.5}', "none"], [{"q": 1}] * 4, chat=chat) == [7, 10, 2.5, 0]
    assert seen[0][0] == "tiny-llama" and seen[0][1][0][0]["content"] == "Q 1|7"
    assert "number from 0 to 10" in seen[0][1][0][-1]["content"]
    label = {"type": "label_model", "name": "pos", "model": "m", "labels": ["positive", "negative", "neutral"],
             "passing_labels": ["positive"], "input": [{"role": "user", "content": "x|{{sample.output_text}}"}]}
    assert grade(label, ["positive", "Negative.", "I'd say positive overall", "?"], chat=chat) == [1, 0, 1, 0]
    assert parse_score('{"result": -3}', 0, 1) == 0 and parse_label('{"result": "neutral"}', ["neutral", "x"]) == "neutral"


def test_python_grader_runs_in_a_subprocess_with_item_and_sample() -> None:
    spec = {"type": "python", "name": "py", "source": (
        "import os\n"
        "def grade(sample, item):\n"
        "    print('noise on stdout must not break the protocol')\n"
        "    return float(sample['output_text'] == item['answer']) + os.getpid() * 0\n")}
    assert grade(spec, ["4", "5"], [{"answer": "4"}, {"answer": "4"}]) == [1.0, 0.0]
    # and the pid is not ours: the code ran in its own process
    spec["source"] = "import os\ndef grade(sample, item):\n    return float(os.getpid())\n"
    import os

    assert grade(spec, ["x"])[0] != float(os.getpid())


def test_python_grader_loop_is_killed_within_its_time_limit() -> None:
    spec = {"type": "python", "name": "forever", "source": "def grade(sample, item):\n    while True:\n        pass\n"}
    t0 = time.monotonic()
    with pytest.raises(GraderError, match=r"python grader 'forever' did not finish grade\(\) within 1s"):
        grade(spec, ["x"], timeout_s=1.0)
    assert time.monotonic() - t0 < 10


def test_python_grader_memory_limit_and_errors() -> None:
    hog = {"type": "python", "name": "hog", "source": "def grade(sample, item):\n    x = bytearray(2 * 1024**3)\n"
           "    return 1.0\n"}
    with pytest.raises(GraderError, match="MemoryError"):
        grade(hog, ["x"], memory_mb=256)
    bad = {"type": "python", "name": "bad", "source": "def grade(sample, item):\n    return 'high'\n"}
    with pytest.raises(GraderError, match="returned str"):
        grade(bad, ["x"])
    boom = {"type": "python", "name": "boom", "source": "def grade(sample, item):\n    return 1 / 0\n"}
    with pytest.raises(GraderError, match="line 2: ZeroDivisionError"):
        grade(boom, ["x"])


def test_python_grader_cannot_connect_or_spawn() -> None:
    """A listening socket in this process: the grader's connect fails (audit hook, and a network namespace
    where this system allows one); so does starting a process."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    accepted: list[Any] = []
    t = threading.Thread(target=lambda: accepted.append(srv.accept()), daemon=True)
    t.start()
    spec = {"type": "python", "name": "net", "source": (
        "import socket, subprocess\n"
        "def grade(sample, item):\n"
        "    what = sample['output_text']\n"
        "    try:\n"
        f"        if what == 'net': socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
        "        else: subprocess.run(['true'])\n"
        "        return 1.0\n"
        "    except Exception:\n"
        "        return 0.0\n")}
    assert grade(spec, ["net", "proc"]) == [0.0, 0.0]
    t.join(0.5)
    srv.close()
    assert not accepted
    assert network_isolation() in ("namespace+audit-hook", "audit-hook")


@pytest.mark.parametrize(("spec", "param", "why"), [
    ({"type": "string_check", "name": "s", "input": OUT, "reference": "x", "operation": "contains"},
     "grader.operation", "'eq', 'ne', 'like' or 'ilike'"),
    ({"type": "regex", "name": "s"}, "grader.type", "not a grader type"),
    ({"name": "s"}, "grader.type", "is required"),
    ({"type": "string_check", "name": "s", "input": OUT, "operation": "eq"}, "grader.reference", "is required"),
    ({"type": "string_check", "name": "s", "input": "{{output}}", "reference": "x", "operation": "eq"},
     "grader.input", "not a reference"),
    ({"type": "text_similarity", "name": "s", "input": OUT, "reference": "x", "evaluation_metric": "cosine"},
     "grader.evaluation_metric", "embeddings"),
    ({"type": "python", "name": "p", "source": "def score(x):\n    return 1\n"}, "grader.source", "def grade"),
    ({"type": "python", "name": "p", "source": "def grade(s, i):\n  return (\n"}, "grader.source", "does not parse"),
    ({"type": "score_model", "name": "j", "model": "m", "input": [{"role": "user", "content": "x"}],
      "range": [1, 0]}, "grader.range", "low < high"),
    ({"type": "label_model", "name": "l", "model": "m", "input": [{"role": "user", "content": "x"}],
      "labels": ["a", "b"], "passing_labels": ["c"]}, "grader", "not among labels"),
    ({"type": "multi", "name": "m", "calculate_output": "a + os", "graders": {
        "a": {"type": "string_check", "name": "a", "input": OUT, "reference": "x", "operation": "eq"}}},
     "grader.calculate_output", "not one of the graders"),
    ({"type": "multi", "name": "m", "calculate_output": "a", "graders": {
        "a": {"type": "string_check", "name": "a", "input": OUT, "reference": "x", "operation": "equals"}}},
     "grader.graders.a.operation", "'eq'"),
    ({"type": "string_check", "name": "s", "input": OUT, "reference": "x", "operation": "eq", "extra": 1},
     "grader.extra", "unknown field"),
])
def test_invalid_graders_name_the_field(spec: dict[str, Any], param: str, why: str) -> None:
    with pytest.raises(GraderError, match=why) as e:
        parse_grader(spec)
    assert e.value.param == param
