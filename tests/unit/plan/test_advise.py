"""`tunelab plan advise`: the guide's rules on measured numbers, BM25 retrieval, the answers file, the CLI end
to end on a tiny model, and (slow) the two bundled tasks' advice with the real SmolLM2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tunelab.cli import main
from tunelab.data.readers import read_conversations
from tunelab.errors import ConfigError
from tunelab.plan.advise import Answers, _bm25_shots, read_answers, recommend, with_shots

ROOT = Path(__file__).resolve().parents[3]
PRODUCTS = ROOT / "tunelab" / "resources" / "products"


def _rows(p: float, r: float, f: float, tok_p: float = 60, tok_r: float = 400) -> dict:
    def row(v: float, tok: float) -> dict:
        return {"m": v, "prompt_tokens": tok, "latency_s": 0.1, "training_s": 0.0}

    return {"prompting": row(p, tok_p), "retrieval": row(r, tok_r), "fine-tune": row(f, tok_p)}


def test_format_gap_is_a_behaviour_problem_fine_tune() -> None:
    rec = recommend(_rows(0.0, 0.55, 0.95), "m", Answers())
    assert rec["choice"] == "fine-tune"
    assert "behaviour gap" in rec["reasons"][0] and "340 fewer prompt tokens" in rec["reasons"][0]
    assert "input tokens a month" in recommend(_rows(0.0, 0.55, 0.95), "m", Answers(calls_per_month=1e7))["reasons"][1]


def test_facts_only_retrieval_supplies_are_a_knowledge_problem() -> None:
    rec = recommend(_rows(0.0, 0.8, 0.1), "m", Answers())
    assert rec["choice"] == "retrieval" and "knowledge gap" in rec["reasons"][0]


def test_prompting_near_target_means_do_not_fine_tune() -> None:
    assert recommend(_rows(0.86, 0.9, 0.95), "m", Answers(target=1.0))["choice"] == "prompting"


def test_data_that_changes_often_goes_to_retrieval() -> None:
    assert recommend(_rows(0.2, 0.85, 0.9), "m", Answers())["choice"] == "fine-tune"
    rec = recommend(_rows(0.2, 0.85, 0.9), "m", Answers(data_changes="often"))
    assert rec["choice"] == "retrieval" and any("changes often" in r for r in rec["reasons"])


def test_bm25_finds_the_fact_behind_a_held_out_question() -> None:
    train = read_conversations(PRODUCTS / "train.jsonl")
    evals = read_conversations(PRODUCTS / "eval.jsonl")
    shots = _bm25_shots(train, evals, 3)
    hits = sum(any(e.completion in s.completion for s in ss) for e, ss in zip(evals, shots, strict=True))
    assert hits / len(evals) >= 0.9
    aug = with_shots(evals[0], shots[0])
    assert [m.role for m in aug.messages] == ["user", "assistant"] * 4
    assert aug.prompt[-1].content == evals[0].prompt[-1].content and aug.completion == evals[0].completion


def test_held_out_questions_are_not_in_the_training_file() -> None:
    train_q = {c.prompt[-1].content for c in read_conversations(PRODUCTS / "train.jsonl")}
    assert not any(c.prompt[-1].content in train_q for c in read_conversations(PRODUCTS / "eval.jsonl"))


def test_answers_file(tmp_path: Path) -> None:
    p = tmp_path / "a.yaml"
    p.write_text("data_changes: often\ncalls_per_month: 1000000\ntarget: 0.9\n")
    assert read_answers(p) == Answers("often", 1000000, 0.9)
    p.write_text("data_change: often\n")
    with pytest.raises(ConfigError, match="unknown key 'data_change'"):
        read_answers(p)
    p.write_text("data_changes: weekly\n")
    with pytest.raises(ConfigError, match="data_changes: expected one of"):
        read_answers(p)


def _tiny_task(tmp_path: Path, tiny_dir: Path) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"What is the code of item {i}?"},
                          {"role": "assistant", "content": f"code {i * 7}"}]} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:3]))
    cfg = {"model": {"name": str(tiny_dir)}, "data": {"train": str(tmp_path / "train.jsonl"), "max_seq_len": 64},
           "train": {"batch_size": 4}, "eval": {"metrics": ["contains_answer"], "forgetting": False,
                                                  "generation": {"max_new_tokens": 4}},
           "output_dir": str(tmp_path / "run")}
    (tmp_path / "cfg.yaml").write_text(yaml.safe_dump(cfg))
    return tmp_path / "cfg.yaml"


def test_cli_end_to_end_on_a_tiny_model(tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _tiny_task(tmp_path, tiny_dir)
    (tmp_path / "ans.yaml").write_text("calls_per_month: 1000\n")
    with pytest.raises(SystemExit) as e:
        main(["plan", "advise", str(cfg), "--data", str(tmp_path / "eval.jsonl"), "--probe-steps", "2",
              "--answers", str(tmp_path / "ans.yaml"), "--json"])
    assert e.value.code == 0
    adv = json.loads(capsys.readouterr().out)
    assert set(adv["options"]) == {"prompting", "retrieval", "fine-tune"} and adv["metric"] == "contains_answer"
    assert adv["options"]["retrieval"]["prompt_tokens"] > 2 * adv["options"]["prompting"]["prompt_tokens"]
    assert adv["options"]["fine-tune"]["training_s"] > 0
    assert adv["constrained_decoding"]["available"] is False and "no eval.json_schema" in adv["constrained_decoding"]["reason"]
    assert adv["recommendation"]["choice"] in ("prompting", "retrieval", "fine-tune", "none")
    assert json.loads((tmp_path / "run" / "plan" / "advice.json").read_text())["kind"] == "tunelab-advice"
    html = (tmp_path / "run" / "report.html").read_text()
    assert "Before training: the advice" in html and "advice-table" in html


def test_interactive_mode_asks(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.plan.advise import ask_answers

    replies = iter(["weekly", "often", "5000", "0.8"])
    ans = ask_answers(lambda q, d: next(replies))
    assert ans == Answers("often", 5000.0, 0.8)


def _advise_real(task: str, tmp_path: Path, steps: int, n: int, data: Path, cfg: Path, tokens: int) -> dict:
    from tunelab.plan.advise import advise

    return advise(cfg, data, probe_steps=steps, max_examples=n, workdir=tmp_path / task, max_new_tokens=tokens)


@pytest.mark.slow
def test_clinical_task_advice_is_fine_tune(tmp_path: Path) -> None:
    cfg = ROOT / "tunelab" / "resources" / "configs" / "demo_clinical_lora.yaml"
    adv = _advise_real("clinical", tmp_path, 30, 12, ROOT / "tunelab" / "resources" / "clinical" / "test.jsonl", cfg,
                       128)
    o = adv["options"]
    assert adv["metric"] == "json_valid"
    assert o["prompting"]["json_valid"] <= 0.1 and o["fine-tune"]["json_valid"] >= 0.8
    assert adv["recommendation"]["choice"] == "fine-tune", adv["recommendation"]


@pytest.mark.slow
def test_products_task_advice_is_retrieval(tmp_path: Path) -> None:
    adv = _advise_real("products", tmp_path, 30, 20, PRODUCTS / "eval.jsonl", PRODUCTS / "config.yaml", 24)
    o = adv["options"]
    assert adv["metric"] == "contains_answer"
    assert o["retrieval"]["contains_answer"] >= o["prompting"]["contains_answer"] + 0.3
    assert adv["recommendation"]["choice"] == "retrieval", adv["recommendation"]


def test_constrained_rung_holds_zero_shot_answers_to_the_schema() -> None:
    import tiny

    from tunelab.data.records import Conversation, Message
    from tunelab.plan.advise import _constrained_rung

    schema = {"type": "object", "properties": {"label": {"enum": ["cat", "dog"]}, "n": {"type": "integer",
              "minimum": 0, "maximum": 9}}, "required": ["label", "n"], "additionalProperties": False}
    evals = [Conversation((Message("user", f"q{i}"), Message("assistant", "a"))) for i in range(3)]
    got = _constrained_rung(tiny.tiny_model(), tiny.tiny_tokenizer(), evals, schema, None, 40, lambda s: None)
    assert got["available"] is True and got["schema_valid"] == 1.0 and "100% of zero-shot answers" in got["reason"]
