"""End to end through the CLI on the real SmolLM2-135M-Instruct: `tunelab train` of the shipped dpo.yaml."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.train.tracking import read_metrics

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_dpo_on_smollm2_through_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.cli import main

    monkeypatch.chdir(tmp_path)  # the shipped config's data paths are relative to its own folder
    out = tmp_path / "dpo"
    args = ["train", str(ROOT / "tunelab" / "resources" / "configs" / "dpo.yaml"), "--set", "train.max_steps=2", "--set", "train.batch_size=2",
            "--set", "train.eval_every=2", "--set", "train.eval_max_examples=4", "--set", "data.max_seq_len=128",
            "--set", f"output_dir={out}"]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code in (0, None)
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    rows = read_metrics(out)
    train_rows = [r for r in rows if "train_loss" in r]
    valid = [r for r in rows if "valid_accuracy" in r]
    assert [r["step"] for r in train_rows] == [1, 2]
    assert train_rows[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # adapter starts as a no-op: log 2
    assert valid[0].get("baseline") and valid[-1]["step"] == 2
