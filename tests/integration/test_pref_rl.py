"""GRPO and PPO on a tiny task a 2-layer model can learn in seconds: answer "list N" with the JSON list "[N]".

A warm start (SFT through the real loop, full fine-tuning) on answers that are half "[N]" and half the broken
"[N" leaves a policy whose samples are roughly half valid JSON. From there:
  GRPO with the json_valid reward must raise the valid-JSON rate of fresh samples;
  PPO with a reward model (trained here on "[N]" over "[N" pairs) must raise the reward model's mean score
  while the KL to the reference stays bounded.
And the rollout phase's contract: every prompt the loop hands out is rolled out; reusing a rollout for several
optimizer steps moves the importance ratio off 1 (so clipping acts), one step per rollout keeps it exactly 1;
validation reports reward, and the best step is the one with the highest.
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
from tunelab.train import loop as loop_mod
from tunelab.train.grpo import GRPO, json_valid, sample
from tunelab.train.ppo import PPO
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


@pytest.fixture(scope="module")
def rm_run(task: dict[str, Any]) -> Path:
    """A reward model preferring "[N]" over "[N", trained through the loop from the warm start."""
    tmp = task["tmp"]
    pairs = [{"prompt": f"list {i}", "chosen": f"[{i}]", "rejected": f"[{i}"} for i in range(N_PROMPTS)]
    res = train(base_cfg(tmp, task["warm"], "rm", write(tmp / "pairs.jsonl", pairs), method="reward",
                         train={"max_steps": 12, "batch_size": 8, "lr": 5e-3}), show_progress=False)
    return res.run_dir


GRPO_JSON = {"group_size": 8, "kl_coef": 0.01, "rewards": [{"fn": "json_valid"}], "generation": {"max_new_tokens": 6}}


def test_grpo_raises_valid_json_rate(task: dict[str, Any]) -> None:
    before = valid_rate(task["warm"])
    assert 0.15 < before < 0.85, before  # the warm start really is mixed: there is something to learn
    cfg = base_cfg(task["tmp"], task["warm"], "grpo", task["prompts"], method="grpo", grpo=GRPO_JSON,
                   train={"max_steps": 10, "batch_size": 4, "lr": 1e-2})
    res = train(cfg, show_progress=False)
    after = valid_rate(str(res.run_dir))
    assert after > before + 0.15, (before, after)
    logged = [r for r in read_metrics(res.run_dir) if "train_reward" in r]
    assert all("train_kl" in r and "train_r_json_valid" in r for r in logged)
    # One optimizer step per rollout: the policy being updated is the one that sampled, the ratio is exactly 1.
    assert all(r["train_approx_kl"] == 0.0 and r["train_clipfrac"] == 0.0 and r["train_ratio_mean"] == 1.0
               for r in logged)


def test_ppo_raises_reward_with_bounded_kl(task: dict[str, Any], rm_run: Path) -> None:
    tmp = task["tmp"]
    from tunelab.train.reward import RewardModel

    rm = RewardModel.load(rm_run)

    def mean_reward(target: str) -> float:
        texts, msgs = sampled(target)
        return sum(rm.score(msgs, texts)) / len(texts)

    before = mean_reward(task["warm"])
    cfg = base_cfg(tmp, task["warm"], "ppo", task["prompts"], method="ppo",
                   ppo={"reward_model": str(rm_run), "kl_coef": 0.2, "ppo_epochs": 2, "vf_coef": 0.1,
                        "generation": {"max_new_tokens": 6}},
                   train={"max_steps": 6, "batch_size": 8, "lr": 5e-3})  # 6 rollouts x 2 epochs = 12 updates
    res = train(cfg, show_progress=False)
    after = mean_reward(str(res.run_dir))
    assert after > before, (before, after)
    rows = [r for r in read_metrics(res.run_dir) if "train_kl" in r]
    assert rows and all(abs(r["train_kl"]) < 3.0 for r in rows), [r["train_kl"] for r in rows]
    assert {"train_reward", "train_r_model", "train_entropy", "train_clipfrac", "train_value_loss"} <= rows[-1].keys()
    assert all(r["train_optimizer_steps"] == 2 and r["train_prompts"] == 8 for r in rows)
    assert any(r.get("train_clipfrac", 0) > 0 for r in rows)  # reused rollouts do get clipped


@pytest.mark.parametrize("method", ["ppo", "grpo"])
def test_every_prompt_handed_out_is_rolled_out(task: dict[str, Any], rm_run: Path, method: str,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Three steps of 8 prompts (a whole epoch of the 24) with rollouts reused for 2 epochs: every prompt the
    loop hands out is sampled in the step it is handed out -- once for PPO, group_size times for GRPO.
    (PPO used to sample only on every ppo_epochs-th step and ignore the prompts of the steps between.)"""
    handed: list[list[tuple[int, ...]]] = []
    sampled_ids: list[list[tuple[int, ...]]] = []
    real_mbs = loop_mod.micro_batches

    def spy_mbs(ctx: Any, epoch: int, step_in_epoch: int) -> Any:
        mbs = real_mbs(ctx, epoch, step_in_epoch)
        handed.append([tuple(i.ids) for mb in mbs for i in mb])
        sampled_ids.append([])
        return mbs

    klass: Any = PPO if method == "ppo" else GRPO
    real_sample = klass._sample

    def spy_sample(self: Any, model: Any, prompts: list[list[int]]) -> Any:
        sampled_ids[-1].extend(tuple(p) for p in prompts)
        return real_sample(self, model, prompts)

    monkeypatch.setattr(loop_mod, "micro_batches", spy_mbs)
    monkeypatch.setattr(klass, "_sample", spy_sample)
    section = ({"ppo": {"reward_model": str(rm_run), "ppo_epochs": 2, "generation": {"max_new_tokens": 4}}}
               if method == "ppo" else {"grpo": {**GRPO_JSON, "group_size": 2, "num_iterations": 2,
                                                 "generation": {"max_new_tokens": 4}}})
    cfg = base_cfg(task["tmp"], task["warm"], f"every-{method}", task["prompts"], method=method,
                   train={"max_steps": 3, "batch_size": 4, "grad_accum": 2}, **section)
    res = train(cfg, show_progress=False)
    group = 1 if method == "ppo" else 2
    assert len(handed) == 3 and all(len(h) == 8 for h in handed)
    assert len({p for h in handed for p in h}) == N_PROMPTS  # one epoch: each prompt handed out once
    for h, s in zip(handed, sampled_ids, strict=True):
        assert sorted(s) == sorted(h * group)
    rows = [r for r in read_metrics(res.run_dir) if "train_prompts" in r]
    assert [r["train_prompts"] for r in rows] == [8, 8, 8]


def test_grpo_reuse_moves_the_ratio_and_clips(task: dict[str, Any]) -> None:
    """num_iterations 2 x num_minibatches 2: four optimizer steps per rollout, scored against the log-probs
    recorded when sampling. After the first the policy has moved, so the ratio is no longer 1 (approx_kl > 0)
    and, with a tight clip_eps, some tokens are clipped."""
    cfg = base_cfg(task["tmp"], task["warm"], "grpo-reuse", task["prompts"], method="grpo",
                   grpo={**GRPO_JSON, "num_iterations": 2, "num_minibatches": 2, "clip_eps": 0.05},
                   train={"max_steps": 3, "batch_size": 4, "lr": 1e-2})
    res = train(cfg, show_progress=False)
    rows = [r for r in read_metrics(res.run_dir) if "train_reward" in r]
    assert len(rows) == 3 and all(r["train_optimizer_steps"] == 4 for r in rows)
    assert all(r["train_approx_kl"] > 1e-6 and r["train_ratio_mean"] != 1.0 for r in rows), rows
    assert any(r["train_clipfrac"] > 0 for r in rows), [r["train_clipfrac"] for r in rows]


def test_rl_validation_is_reward_and_the_best_step_is_the_highest(task: dict[str, Any]) -> None:
    """Validation after every step reports reward (no loss); the best step is where it is highest, state.json
    says which metric and direction; and sampling the validation prompts leaves training's random stream
    alone: the same run without validation trains identically."""
    tmp = task["tmp"]
    valid = write(tmp / "valid-prompts.jsonl", [{"prompt": f"list {i}", "completion": f"[{i}]"} for i in range(24)])
    settings: dict[str, Any] = {"method": "grpo", "grpo": GRPO_JSON,
                                "train": {"max_steps": 6, "batch_size": 4, "lr": 2e-2, "eval_every": 2}}
    res = train(base_cfg(tmp, task["warm"], "grpo-valid", task["prompts"], data={"validation": valid}, **settings),
                show_progress=False)
    rows = read_metrics(res.run_dir)
    valid_rows = [r for r in rows if "valid_reward" in r]
    assert [r["step"] for r in valid_rows] == [2, 4, 6]
    assert not any("valid_loss" in r for r in rows)
    rewards = [r["valid_reward"] for r in valid_rows]
    assert min(rewards) < max(rewards), rewards  # so the lowest (a loss-shaped choice) would be a different step
    st = res.state
    assert st.best_valid == max(rewards) and st.best_step == valid_rows[rewards.index(max(rewards))]["step"]
    assert st.describe_best() == f"best validation reward {max(rewards):.4f} at step {st.best_step}"
    saved = json.loads((res.run_dir / "state.json").read_text())
    assert saved["valid_metric"] == "reward" and saved["higher_is_better"] is True
    plain = train(base_cfg(tmp, task["warm"], "grpo-novalid", task["prompts"], **settings), show_progress=False)
    trained = [r["train_reward"] for r in rows if "train_reward" in r]
    assert trained == [r["train_reward"] for r in read_metrics(plain.run_dir) if "train_reward" in r]


def test_ppo_resumes_between_rollouts_to_the_same_weights(task: dict[str, Any], rm_run: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """A step is rollout + its optimizer steps, so a checkpoint between steps holds everything (weights, value
    head, optimizer, RNG): interrupted after the step-2 checkpoint and resumed, PPO ends on the same adapter
    and value head as a straight run. (Rollouts reused across loop steps used to live only in memory.)"""
    from safetensors.torch import load_file

    from tunelab.train.rollout import RolloutMethod

    def cfg(out: str) -> Any:
        return base_cfg(task["tmp"], task["warm"], out, task["prompts"], method="ppo",
                        ppo={"reward_model": str(rm_run), "ppo_epochs": 2, "num_minibatches": 2,
                             "generation": {"max_new_tokens": 4}},
                        train={"max_steps": 4, "batch_size": 4, "save_every": 2, "lr": 5e-3})

    straight = train(cfg("ppo-straight"), show_progress=False)
    real = RolloutMethod.run_step

    def crash(self: Any, ctx: Any, mbs: Any) -> Any:
        if ctx.state.step == 3:
            raise KeyboardInterrupt
        return real(self, ctx, mbs)

    monkeypatch.setattr(RolloutMethod, "run_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg("ppo-broken"), show_progress=False)
    monkeypatch.setattr(RolloutMethod, "run_step", real)
    resumed = train(cfg("ppo-broken"), resume=True, show_progress=False)
    for f in ("adapter/adapter_model.safetensors", "ppo_value_head.safetensors"):
        a, b = load_file(str(straight.run_dir / f)), load_file(str(resumed.run_dir / f))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a), f
