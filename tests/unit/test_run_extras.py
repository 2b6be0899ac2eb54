"""Run-level extras: TensorBoard and MLflow tracking, the contamination warning, data mixing, manifest."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import tiny
from rich.console import Console

from tunelab.config import config_from_dict
from tunelab.train.run import load_data, train


def cfg_for(tmp_path: Path, model_dir: Path, **extra: Any) -> Any:
    tiny.write_jsonl(tmp_path / "train.jsonl", tiny.chat_rows(12))
    raw: dict[str, Any] = {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "data": {"train": str(tmp_path / "train.jsonl"), "max_seq_len": 64},
        "train": {"max_steps": 2, "batch_size": 4},
        "output_dir": str(tmp_path / "run"),
    }
    raw.update(extra)
    return config_from_dict(raw)


def test_tensorboard_and_mlflow_tracking(tmp_path: Path, tiny_dir: Path) -> None:
    res = train(cfg_for(tmp_path, tiny_dir, track=["tensorboard", "mlflow"]))
    events = list((res.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{(res.run_dir / 'mlflow.db').resolve()}")
    (exp,) = [e for e in client.search_experiments() if e.name == "tunelab"]
    (run,) = client.search_runs([exp.experiment_id])
    history = client.get_metric_history(run.info.run_id, "train_loss")
    assert [m.step for m in history] == [1, 2]
    assert run.data.params["finetune"] == "lora"


def test_contamination_warning(tmp_path: Path, tiny_dir: Path) -> None:
    rows = tiny.chat_rows(12)
    tiny.write_jsonl(tmp_path / "valid.jsonl", rows[:3] + tiny.chat_rows(3, seed=99))
    cfg = cfg_for(tmp_path, tiny_dir, data={"train": str(tiny.write_jsonl(tmp_path / "train12.jsonl", rows)),
                                            "validation": str(tmp_path / "valid.jsonl"), "max_seq_len": 64})
    console = Console(record=True, width=300)
    train(cfg, console=console, show_progress=False)
    text = console.export_text()
    m = re.search(r"warning: (\d+) validation example\(s\) overlap the training data \(e\.g\. validation line 1 ~ train line 1", text)
    assert m and int(m.group(1)) >= 3, text  # the 3 copies, plus any short row sharing its only n-gram


def test_data_mix_fraction(tmp_path: Path, tiny_dir: Path, tok: Any) -> None:
    general = tiny.write_jsonl(tmp_path / "general.jsonl",
                               [{"messages": [{"role": "user", "content": f"g{i}"}, {"role": "assistant", "content": "ok"}]}
                                for i in range(50)])
    cfg = cfg_for(tmp_path, tiny_dir, data={"train": str(tiny.write_jsonl(tmp_path / "train40.jsonl", tiny.chat_rows(40))),
                                            "mix": {"path": str(general), "fraction": 0.2}})
    train_recs, _ = load_data(cfg, "conversation", tok, None)
    mixed = [r for r in train_recs if r.messages[0].content.startswith("g")]  # type: ignore[union-attr]
    assert len(train_recs) == 50 and len(mixed) == 10  # 10 / 50 = 20%


def test_manifest_records_hashes_and_versions(tmp_path: Path, tiny_dir: Path) -> None:
    res = train(cfg_for(tmp_path, tiny_dir))
    man = json.loads((res.run_dir / "manifest.json").read_text())
    assert len(man["data"]["train"]["sha256"]) == 64 and man["seed"] == 42
    assert {"torch", "transformers", "peft", "tunelab"} <= set(man["versions"])


def test_a_run_tokenizes_its_data_once(tmp_path: Path, tiny_dir: Path, tok: Any, monkeypatch: Any) -> None:
    """Validation encodes every record with the run's own rule; training reuses those encodings instead of
    tokenizing the file a second time (issue 11, item 6)."""
    from tunelab.train import sft as sft_mod
    from tunelab.train.sft import SFT

    cfg = cfg_for(tmp_path, tiny_dir)
    method = SFT(cfg, tok)
    recs, _ = load_data(cfg, "conversation", tok, None, method.pre_encoded)
    assert len(method.pre_encoded) == len(recs) == 12
    calls: list[Any] = []
    monkeypatch.setattr(sft_mod, "encode", lambda *a, **k: calls.append(a))
    items = [method.encode(r) for r in recs]
    assert not calls and items == [method.pre_encoded[id(r)] for r in recs]


def _general(tmp_path: Path, n: int) -> Path:
    return tiny.write_jsonl(tmp_path / "general.jsonl",
                            [{"messages": [{"role": "user", "content": f"general question {i}"},
                                           {"role": "assistant", "content": "the file's answer"}]} for i in range(n)])


def test_mix_self_answers_are_the_base_models_own(tmp_path: Path, tiny_dir: Path) -> None:
    """`data.mix.answers: self`: the drawn general prompts are answered by the base model (greedy, before
    training) and those answers are what is trained on; answers cut by the length limit are dropped; the answers
    are kept in the run folder and a resume trains on the same ones."""
    from tunelab.generate import Generator
    from tunelab.rundir import RunDir

    cfg = cfg_for(tmp_path, tiny_dir, data={"train": str(tiny.write_jsonl(tmp_path / "train40.jsonl", tiny.chat_rows(40))),
                                            "max_seq_len": 256,
                                            "mix": {"path": str(_general(tmp_path, 30)), "fraction": 0.2,
                                                    "answers": "self", "max_new_tokens": 160}})
    res = train(cfg, show_progress=False)
    saved = [json.loads(x)["messages"] for x in RunDir(res.run_dir).mix_answers_path.read_text().splitlines()]
    # What the same untrained model answers on its own, through the public generation API.
    g = Generator.load(str(tiny_dir), dtype="fp32")  # as the run loads it
    drawn = sorted({m[0]["content"] for m in saved})
    prompts = [f"general question {i}" for i in range(30)]
    outs = dict(zip(prompts, g.generate([[{"role": "user", "content": p}] for p in prompts], max_tokens=160), strict=True))
    ended = {p for p, c in outs.items() if c.finish_reason == "stop"}
    assert saved and set(drawn) <= ended  # only answers that ended are kept...
    for m in saved:  # ...and each is the model's own greedy answer, not the file's
        assert m[1]["role"] == "assistant" and m[1]["content"] == outs[m[0]["content"]].text.strip() != "the file's answer"
    # The run trains on exactly these: load_data reads them back instead of generating again.
    train_recs, _ = load_data(cfg, "conversation", g.tokenizer, None, model=None)
    mixed = [r for r in train_recs if r.messages[0].content.startswith("general")]  # type: ignore[union-attr]
    assert [[x.content for x in r.messages] for r in mixed] == [[m[0]["content"], m[1]["content"]] for m in saved]  # type: ignore[union-attr]


def test_mix_self_answers_none_ended_is_a_clear_error(tmp_path: Path, tiny_dir: Path) -> None:
    cfg = cfg_for(tmp_path, tiny_dir, data={"train": str(tiny.write_jsonl(tmp_path / "train40.jsonl", tiny.chat_rows(40))),
                                            "mix": {"path": str(_general(tmp_path, 5)), "answers": "self", "max_new_tokens": 1}})
    import pytest

    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match=r"none of the base model's [45] answers .*max_new_tokens=1; raise it"):
        train(cfg, show_progress=False)


def test_mix_self_answers_only_for_sft() -> None:
    import pytest

    from tunelab.errors import ConfigError

    with pytest.raises(ConfigError, match="data.mix.answers: self generates chat answers for SFT; method dpo"):
        config_from_dict({"model": {"name": "x"}, "method": "dpo", "data": {"train": "t.jsonl", "mix": {"path": "g", "answers": "self"}},
                          "output_dir": "r"})
