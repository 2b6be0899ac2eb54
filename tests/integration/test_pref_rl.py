"""GRPO and PPO on a tiny task a 2-layer model can learn in seconds: answer "list N" with the JSON list "[N]".

A warm start (SFT through the real loop, full fine-tuning) on answers that are half "[N]" and half the broken
"[N" leaves a policy whose samples are roughly half valid JSON. From there:
  GRPO with the json_valid reward must raise the valid-JSON rate of fresh samples;
  PPO with a reward model (trained here on "[N]" over "[N" pairs) must raise the reward model's mean score
  while the KL to the reference stays bounded.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.config import config_from_dict
from tunelab.data.records import Message
from tunelab.data.templates import encode_prompt
from tunelab.model.adapters import load_for_inference
from tunelab.train.grpo import json_valid, sample
from tunelab.train.run import train
from tunelab.train.tracking import read_metrics

N_PROMPTS = 24


def write(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def base_cfg(tmp_path: Path, model: str, out: str, train_file: str, **sections: Any) -> Any:
    raw: dict[str, Any] = {
        "model": {"name": model, "dtype": "fp32"},
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": train_file, "max_seq_len": 64, "min_examples": 1},
        "train": {"batch_size": 16, "lr": 3e-3, "warmup_ratio": 0.0, "seed": 5, "max_grad_norm": 1.0},
        "eval": {"baseline": False},
        "output_dir": str(tmp_path / out),
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            raw.setdefault(k, {}).update(v)
        else:
            raw[k] = v
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory, tiny_dir: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("rl-task")
    sft_rows = [{"prompt": f"list {i}", "completion": f"[{i}]" if i % 2 == 0 else f"[{i}"} for i in range(N_PROMPTS)]
    prompts = write(tmp / "prompts.jsonl", [{"prompt": f"list {i}", "completion": f"[{i}]"} for i in range(N_PROMPTS)])
    warm = train(base_cfg(tmp, str(tiny_dir), "warm", write(tmp / "sft.jsonl", sft_rows), finetune="full",
                          train={"max_steps": 40}), show_progress=False)
    return {"tmp": tmp, "warm": str(warm.run_dir / "model"), "prompts": prompts}


def sampled(target: str, n: int = 96, seed: int = 0) -> tuple[list[str], list[tuple[Message, ...]]]:
    model, tok, _ = load_for_inference(target)
    from tunelab.config import GenerationConfig

    msgs = [(Message("user", f"list {i % N_PROMPTS}"),) for i in range(n)]
    torch.manual_seed(seed)
    r = sample(model, tok, [encode_prompt(tok, list(m)) for m in msgs], GenerationConfig(max_new_tokens=6))
    return r.texts, msgs


def valid_rate(target: str) -> float:
    texts, _ = sampled(target)
    return sum(json_valid(t) for t in texts) / len(texts)


def test_grpo_raises_valid_json_rate(task: dict[str, Any]) -> None:
    before = valid_rate(task["warm"])
    assert 0.15 < before < 0.85, before  # the warm start really is mixed: there is something to learn
    cfg = base_cfg(task["tmp"], task["warm"], "grpo", task["prompts"], method="grpo",
                   grpo={"group_size": 8, "kl_coef": 0.01, "rewards": [{"fn": "json_valid"}],
                         "generation": {"max_new_tokens": 6}},
                   train={"max_steps": 10, "batch_size": 4, "lr": 1e-2})
    res = train(cfg, show_progress=False)
    after = valid_rate(str(res.run_dir))
    assert after > before + 0.15, (before, after)
    logged = [r for r in read_metrics(res.run_dir) if "train_reward" in r]
    assert all("train_kl" in r and "train_r_json_valid" in r for r in logged)


def test_ppo_raises_reward_with_bounded_kl(task: dict[str, Any], tiny_dir: Path) -> None:
    tmp = task["tmp"]
    pairs = [{"prompt": f"list {i}", "chosen": f"[{i}]", "rejected": f"[{i}"} for i in range(N_PROMPTS)]
    rm_run = train(base_cfg(tmp, task["warm"], "rm", write(tmp / "pairs.jsonl", pairs), method="reward",
                            train={"max_steps": 12, "batch_size": 8, "lr": 5e-3}), show_progress=False)
    from tunelab.train.reward import RewardModel

    rm = RewardModel.load(rm_run.run_dir)

    def mean_reward(target: str) -> float:
        texts, msgs = sampled(target)
        return sum(rm.score(msgs, texts)) / len(texts)

    before = mean_reward(task["warm"])
    cfg = base_cfg(tmp, task["warm"], "ppo", task["prompts"], method="ppo",
                   ppo={"reward_model": str(rm_run.run_dir), "kl_coef": 0.2, "ppo_epochs": 2, "vf_coef": 0.1,
                        "generation": {"max_new_tokens": 6}},
                   train={"max_steps": 6, "batch_size": 8, "lr": 5e-3})  # 6 rollouts x 2 epochs = 12 updates
    res = train(cfg, show_progress=False)
    after = mean_reward(str(res.run_dir))
    assert after > before, (before, after)
    rows = [r for r in read_metrics(res.run_dir) if "train_kl" in r]
    assert rows and all(abs(r["train_kl"]) < 3.0 for r in rows), [r["train_kl"] for r in rows]
    assert {"train_reward", "train_entropy", "train_clipfrac"} <= rows[-1].keys()
    assert any(r.get("train_clipfrac", 0) > 0 for r in read_metrics(res.run_dir))  # reused rollouts do get clipped
