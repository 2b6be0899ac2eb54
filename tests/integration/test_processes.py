"""Real processes: two-process DDP (gloo, CPU) agrees with one process; a run killed with SIGKILL resumes to the
same weights as an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import tiny
import torch
import yaml
from safetensors.torch import load_file

from tunelab.config import config_from_dict
from tunelab.train.run import train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def cfg_dict(tmp: Path, model_dir: Path, out: str, **train_kw: Any) -> dict[str, Any]:
    tiny.write_jsonl(tmp / "train.jsonl", tiny.chat_rows(24))
    tiny.write_jsonl(tmp / "valid.jsonl", tiny.chat_rows(6, seed=5))
    return {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
        "data": {"train": str(tmp / "train.jsonl"), "validation": str(tmp / "valid.jsonl"), "max_seq_len": 64},
        "train": {"lr": 1e-3, "warmup_ratio": 0.0, **train_kw},
        "output_dir": str(tmp / out),
    }


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_process_ddp_matches_single_process(tmp_path: Path, tiny_dir: Path) -> None:
    common = {"max_steps": 3, "grad_accum": 2, "eval_every": 3}
    single = cfg_dict(tmp_path, tiny_dir, "single", batch_size=2, **common)
    single["lora"]["dropout"] = 0.0
    ddp = cfg_dict(tmp_path, tiny_dir, "ddp", batch_size=1, **common)  # 2 processes x 1 = the same global batch
    ddp["lora"]["dropout"] = 0.0
    (tmp_path / "ddp.yaml").write_text(yaml.safe_dump(ddp))
    one = train(config_from_dict(single))
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
         "-m", "tunelab.cli", "train", str(tmp_path / "ddp.yaml")],
        capture_output=True, text=True, env=ENV, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports
    assert max_diff(weights(one.run_dir), weights(tmp_path / "ddp")) < 1e-5
    # metrics are reduced across processes: validation loss equals the single-process one
    def last_valid(p: Path) -> float:
        rows = [yaml.safe_load(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
        return [r["valid_loss"] for r in rows if "valid_loss" in r][-1]
    assert abs(last_valid(one.run_dir) - last_valid(tmp_path / "ddp")) < 1e-5


def test_kill_dash_9_then_resume_reaches_same_weights(tmp_path: Path, tiny_dir: Path) -> None:
    settings = {"max_steps": 60, "batch_size": 2, "save_every": 5, "eval_every": 30}
    killed = cfg_dict(tmp_path, tiny_dir, "killed", **settings)
    (tmp_path / "killed.yaml").write_text(yaml.safe_dump(killed))
    proc = subprocess.Popen([sys.executable, "-m", "tunelab.cli", "train", str(tmp_path / "killed.yaml")],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpts = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 240
    while time.time() < deadline and not (ckpts / "step-000015").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "killed" / "adapter").exists()
    straight = train(config_from_dict(cfg_dict(tmp_path, tiny_dir, "straight", **settings)))
    res = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", "--resume", str(tmp_path / "killed")],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stdout
    assert max_diff(weights(straight.run_dir), weights(tmp_path / "killed")) < 1e-6


def load_config_for(run: Path, *overrides: str) -> Any:
    from tunelab.config import load_config

    return load_config(run / "config.yaml", [f"output_dir={run}", *overrides])


def full_weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_fsdp_full_finetuning_matches_single_process_and_resumes(tmp_path: Path) -> None:
    # Tied input/output embeddings like SmolLM2: the tied weight must stay one parameter through sharding.
    model_dir = tiny.save_tiny(tmp_path / "tied", tie_word_embeddings=True)
    common = {"max_steps": 4, "save_every": 2, "keep_checkpoints": 5, "eval_every": 2,
              "eval_max_examples": 5}  # 5 validation examples over 2 processes: shards of 3 and 2 must keep step

    def cfg(out: str, **kw: Any) -> dict[str, Any]:
        d = cfg_dict(tmp_path, model_dir, out, **common, **kw)
        d["finetune"] = "full"
        del d["lora"]
        return d

    def torchrun(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29534", "-m", "tunelab.cli", "train", *args],
                              capture_output=True, text=True, env=ENV, timeout=300)

    one = train(config_from_dict(cfg("single", batch_size=4)))
    # 2 processes x micro-batch 1 x accumulation 2 = the single process's batch of 4
    (tmp_path / "fsdp.yaml").write_text(yaml.safe_dump(cfg("fsdp", batch_size=1, grad_accum=2, fsdp=True)))
    proc = torchrun(str(tmp_path / "fsdp.yaml"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sharded (FSDP2) across 2 processes" in proc.stdout
    sharded = tmp_path / "fsdp"
    # the saved model is an ordinary, whole Hugging Face model, equal to the single-process one
    assert max_diff(full_weights(one.run_dir / "model"), full_weights(sharded / "model")) < 1e-5
    ckpt = "checkpoints/step-000002/model"
    assert max_diff(full_weights(one.run_dir / ckpt), full_weights(sharded / ckpt)) < 1e-5

    def valid_losses(p: Path) -> list[float]:
        rows = [yaml.safe_load(x) for x in (p / "metrics.jsonl").read_text().splitlines()]
        return [r["valid_loss"] for r in rows if "valid_loss" in r]
    assert len(valid_losses(sharded)) == 3  # baseline, step 2, step 4
    assert max(abs(a - b) for a, b in zip(valid_losses(one.run_dir), valid_losses(sharded), strict=True)) < 1e-5

    # Resume from the step-2 checkpoint (gathered, unsharded state): in one process, and on 2 processes again.
    import shutil

    shutil.rmtree(sharded / "model")
    (sharded / "state.json").unlink()
    shutil.copytree(sharded, tmp_path / "fsdp-then-one")
    alone = load_config_for(tmp_path / "fsdp-then-one", "train.batch_size=4", "train.grad_accum=1")  # same global batch
    train(alone, resume=True)
    assert max_diff(full_weights(one.run_dir / "model"), full_weights(tmp_path / "fsdp-then-one" / "model")) < 1e-5
    proc = torchrun("--resume", str(sharded))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout
    assert max_diff(full_weights(one.run_dir / "model"), full_weights(sharded / "model")) < 1e-5
