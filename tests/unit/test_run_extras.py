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
