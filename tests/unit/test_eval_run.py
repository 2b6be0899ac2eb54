"""Generation, reference loss and the whole `tunelab eval` flow on a tiny in-process Llama and PEFT adapters."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
import yaml

from tunelab.data.readers import read_conversations
from tunelab.eval.config import GenerationSettings
from tunelab.eval.general import build, general_path
from tunelab.eval.generate import generate, reference_loss
from tunelab.eval.run import evaluate, plan, read_results, run_eval


@pytest.fixture(scope="module")
def convs(tmp_path_factory: pytest.TempPathFactory) -> Any:
    rows = tiny.chat_rows(5)
    rows[2]["messages"][0]["content"] = "a much longer prompt than the others " * 3  # uneven lengths exercise padding
    p = tiny.write_jsonl(tmp_path_factory.mktemp("d") / "test.jsonl", rows)
    return read_conversations(p)


def test_batched_generation_equals_one_by_one(convs: Any) -> None:
    model, tok = tiny.tiny_model(), tiny.tiny_tokenizer()
    s = GenerationSettings(max_new_tokens=6, batch_size=5)
    batched = generate(model, tok, convs, s)
    single = [generate(model, tok, [c], s)[0] for c in convs]
    assert batched == single  # left padding must not change any greedy output
    assert len(batched) == len(convs)
    assert generate(model, tok, convs, s) == batched  # greedy: deterministic


def test_reference_loss_matches_per_example_hf_loss(convs: Any) -> None:
    from tunelab.data.templates import encode

    model, tok = tiny.tiny_model(), tiny.tiny_tokenizer()
    res = reference_loss(model, tok, convs, batch_size=3)
    total, n = 0.0, 0
    for c, got in zip(convs, res.per_example, strict=True):
        e = encode(tok, c, train_on="last_assistant")
        with torch.no_grad():
            hf = model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss.item()
        assert got == pytest.approx(hf, abs=1e-5)
        k = e.num_trained - 1 if e.labels[0] != -100 else e.num_trained  # first token is never predicted
        total += hf * k
        n += k
    assert res.tokens == n
    assert res.loss == pytest.approx(total / n, abs=1e-5)
    assert res.perplexity == pytest.approx(math.exp(res.loss), rel=1e-6)


def test_general_set_is_deterministic_and_disjoint() -> None:
    tr, ev = build()
    shipped_tr = [json.loads(x) for x in general_path("train").read_text().splitlines()]
    shipped_ev = [json.loads(x) for x in general_path("eval").read_text().splitlines()]
    assert [r["messages"] for r in tr] == [r["messages"] for r in shipped_tr]  # the generator made these files
    assert [r["messages"] for r in ev] == [r["messages"] for r in shipped_ev]
    prompts_tr = {r["messages"][0]["content"] for r in tr}
    prompts_ev = {r["messages"][0]["content"] for r in ev}
    assert not prompts_tr & prompts_ev
    assert len(prompts_ev) == len(ev) == 60
    # Capitals used in the eval split never appear in train, so mixing cannot leak the forgetting test.
    cap_ev = {r["messages"][1]["content"] for r in ev if "capital" in r["messages"][0]["content"]}
    cap_tr = {r["messages"][1]["content"] for r in tr if "capital" in r["messages"][0]["content"]}
    assert cap_ev and not cap_ev & cap_tr
    assert len(read_conversations(general_path("train"))) == 300  # readable by the training data path


def _make_run(root: Path, name: str, model_dir: Path, data: Path, scale: float, mix: float | None = None) -> Path:
    from peft import LoraConfig, get_peft_model

    run = root / name
    pm = get_peft_model(tiny.tiny_model(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(1)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            p.data = torch.randn_like(p) * scale  # scale 0 = an adapter that changes nothing
    pm.save_pretrained(run / "adapter")
    cfg: dict[str, Any] = {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "data": {"train": str(data)},
        "output_dir": str(run),
        "eval": {
            "metrics": ["exact_match", "json_valid", "rouge_l", "chrf", "bleu"],
            "user_metrics": [f"{root / 'um.py'}:prompt_mentions_output"],
            "generation": {"max_new_tokens": 5, "batch_size": 4},
            "general_max_examples": 6,
            "general_max_new_tokens": 4,
        },
    }
    if mix is not None:
        cfg["data"]["mix"] = {"path": str(general_path("train")), "fraction": mix}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    return run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    model_dir = tiny.save_tiny(root / "tiny-model")
    (root / "um.py").write_text(
        "def prompt_mentions_output(prompt, output, reference):\n"
        "    assert prompt.startswith('user: echo') and isinstance(reference, str)\n"
        "    return float(reference in prompt)\n"
    )
    data = tiny.write_jsonl(root / "test.jsonl", tiny.chat_rows(6))
    zero = _make_run(root, "zero", model_dir, data, 0.0)
    changed = _make_run(root, "changed", model_dir, data, 0.5, mix=0.2)
    return root, data, zero, changed


def test_evaluate_base_and_two_runs(runs: tuple[Path, Path, Path, Path]) -> None:
    root, data, zero, changed = runs
    p = plan(zero, data=data, runs=[changed], system_prompt="Reply in JSON.")
    assert [t.name for t in p.targets] == ["base", "zero", "changed"]
    assert p.outputs == [zero / "eval" / "results.json", changed / "eval" / "results.json"]
    res = evaluate(p)
    base, z, c = res["targets"]
    assert base["system_prompt"] == "Reply in JSON." and z["system_prompt"] is None
    assert c["mix_fraction"] == 0.2
    ex = res["examples"]
    assert len(ex) == res["n_examples"] == 6
    # A zero adapter leaves the base's behaviour (without the system prompt) unchanged, a random one does not.
    assert [e["outputs"]["zero"] for e in ex] != [e["outputs"]["changed"] for e in ex]
    assert z["general"]["outputs"] != c["general"]["outputs"] or z["metrics"]["loss"] != c["metrics"]["loss"]
    for t in res["targets"]:
        m = t["metrics"]
        assert set(m) == {"loss", "perplexity", "exact_match", "json_valid", "rouge_l", "chrf", "bleu",
                          "prompt_mentions_output"}
        assert m["prompt_mentions_output"] == 1.0  # the user metric saw prompt and reference
        assert math.isfinite(m["loss"]) and m["perplexity"] == pytest.approx(math.exp(m["loss"]), rel=1e-6)
        assert 0 <= m["rouge_l"] <= 1 and 0 <= m["chrf"] <= 100
        assert t["general"]["n"] == 6
    f = res["forgetting"]
    assert set(f) == {"zero", "changed"}
    assert f["changed"]["delta"] == pytest.approx(c["general"]["accuracy"] - base["general"]["accuracy"])
    assert res["generation"]["do_sample"] is False and res["generation"]["max_new_tokens"] == 5


def test_zero_adapter_equals_base_without_prompt(runs: tuple[Path, Path, Path, Path]) -> None:
    _, data, zero, _ = runs
    res, paths = run_eval(zero, data=data)  # no system prompt: base and the no-op adapter must agree exactly
    assert paths == [zero / "eval" / "results.json"] and read_results(zero)["examples"] == res["examples"]
    base, z = res["targets"]
    assert [e["outputs"]["base"] for e in res["examples"]] == [e["outputs"]["zero"] for e in res["examples"]]
    assert z["metrics"]["loss"] == pytest.approx(base["metrics"]["loss"], abs=1e-6)
    assert res["forgetting"]["zero"]["delta"] == 0


def test_baseline_results_are_reused_only_when_settings_match(runs: tuple[Path, Path, Path, Path], tmp_path: Path) -> None:
    root, data, zero, changed = runs
    cfg = zero / "config.yaml"
    base_only = evaluate(plan(cfg, data=data, system_prompt="S"))  # the baseline, before any run exists
    assert [t["name"] for t in base_only["targets"]] == ["base"] and base_only["forgetting"] == {}
    logs: list[str] = []
    res = evaluate(plan(cfg, data=data, runs=[changed], system_prompt="S"), log=logs.append, baseline=base_only)
    assert any("reusing the baseline" in m for m in logs)
    assert res["targets"][0] == base_only["targets"][0]
    assert [e["outputs"]["base"] for e in res["examples"]] == [e["outputs"]["base"] for e in base_only["examples"]]
    assert "changed" in res["forgetting"]
    logs.clear()  # a different system prompt changes what the base model sees: recomputed
    evaluate(plan(cfg, data=data, runs=[changed], system_prompt="T"), log=logs.append, baseline=base_only)
    assert not any("reusing" in m for m in logs)


def test_cli_eval_writes_results_and_table(runs: tuple[Path, Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    _, data, _, changed = runs
    out = changed / "eval" / "cli.json"
    with pytest.raises(SystemExit) as e:
        main(["eval", str(changed), "--data", str(data), "--max-examples", "3", "--no-forgetting", "--out", str(out)])
    assert e.value.code == 0
    text = capsys.readouterr().out
    assert "rouge_l" in text and "changed" in text and "base" in text
    res = read_results(out)
    assert res["n_examples"] == 3 and res["forgetting"] == {}


def test_cli_eval_errors_are_clean(runs: tuple[Path, Path, Path, Path], tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    _, data, zero, _ = runs
    with pytest.raises(SystemExit) as e:
        main(["eval", str(zero), "--data", str(tmp_path / "missing.jsonl")])
    assert e.value.code == 2
    assert "missing.jsonl: evaluation data file not found" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["eval", str(zero), "--data", str(data), "--run", str(tmp_path)])
    assert e.value.code == 2
    assert "not a tunelab run folder" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {{name: x}}\ndata: {{train: {data}}}\neval: {{metricz: [bleu]}}\n")
    with pytest.raises(SystemExit) as e:
        main(["eval", str(bad), "--data", str(data)])
    assert e.value.code == 2
    assert "eval.metricz: unknown key" in capsys.readouterr().err


@pytest.mark.slow
def test_eval_on_smollm2_base_and_adapter(tmp_path: Path) -> None:
    """End to end on the real model: base with a system prompt vs a (random) LoRA run, through the CLI."""
    from peft import LoraConfig, get_peft_model

    from tunelab.cli import main
    from tunelab.demo.clinical import JSON_SCHEMA, bundled_path
    from tunelab.model.loading import load_model

    model, _ = load_model("smollm2-135m-instruct", dtype="fp32")
    pm = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    run = tmp_path / "run"
    pm.save_pretrained(run / "adapter")
    (run / "config.yaml").write_text(yaml.safe_dump({
        "model": {"name": "smollm2-135m-instruct", "dtype": "fp32"}, "data": {"train": str(bundled_path("train"))},
        "eval": {"metrics": ["json_valid", "schema", "field_accuracy"], "json_schema": JSON_SCHEMA,
                 "generation": {"max_new_tokens": 8, "batch_size": 2}, "forgetting": False},
    }))
    with pytest.raises(SystemExit) as e:
        main(["eval", str(run), "--data", str(bundled_path("test")), "--max-examples", "2",
              "--system-prompt", "Reply with exactly one JSON object."])
    assert e.value.code == 0
    res = read_results(run)
    base, ft = res["targets"]
    assert base["system_prompt"] == "Reply with exactly one JSON object."
    # A LoRA adapter starts as a no-op (B = 0), so without the system prompt its loss differs from the
    # prompted base only through the prompt; both are the real model's, far below a uniform guess (ln 49152).
    for t in (base, ft):
        assert 0 < t["metrics"]["loss"] < 5 and t["metrics"]["perplexity"] < 150
    assert all(isinstance(x["outputs"]["run"], str) and x["outputs"]["run"] for x in res["examples"])
