"""PPO, RLHF's stage 3, over the shared loop (Ouyang et al. 2022; Schulman et al. 2017), in the shape of
torchtune's PPO recipe: trajectory -> rewards -> advantages -> `ppo_epochs` passes over shuffled minibatches.

Each step (tunelab/train/rollout.py) rolls out every prompt it is handed: one completion per prompt from the
policy, scored by the trained reward model (`ppo.reward_model`, a `method: reward` run) minus an optional length
penalty; `kl_coef * (log pi - log pi_ref)` is charged at every token (the reference is the policy with adapters
disabled, or a frozen copy for full fine-tuning); GAE turns those rewards into advantages (whitened over the
step's rollouts) with a value head on the policy's hidden states. Then `ppo.ppo_epochs` passes, each in
`ppo.num_minibatches` shuffled minibatches, take one optimizer step per minibatch with the clipped surrogate and
clipped value losses; from the second optimizer step on the ratio moves away from 1 and clipping matters.

Logged: reward (the sequence reward trained on: reward model minus length penalty), r_model (the reward
model's score), kl (per sequence, sum over tokens of log pi - log ref), entropy, clipfrac, approx_kl,
value_loss; validation reports reward (higher is better), r_model and kl of fresh samples.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.records import Message
from tunelab.rl_losses import (
    gae_advantages,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)
from tunelab.train.dpo import Reference
from tunelab.train.grpo import sample
from tunelab.train.loop import LoopContext
from tunelab.train.reward import HeadCheckpointMixin, RewardModel, ScalarHead, attach_head, save_head
from tunelab.train.rollout import (
    Experience,
    PromptItem,
    Rollout,
    RolloutMethod,
    completion_forward,
    eval_mode,
)


class PPO(HeadCheckpointMixin, RolloutMethod):
    name = "ppo"
    head_name = "tunelab_value_head"

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        assert cfg.ppo is not None  # the config refuses method ppo without a ppo section
        self.p = cfg.ppo
        self.ref: Reference | None = None
        self.head: ScalarHead | None = None
        self.reward_model: RewardModel | None = None

    @property
    def epochs(self) -> int:
        return int(self.p.ppo_epochs)

    @property
    def minibatches(self) -> int:
        return int(self.p.num_minibatches)

    def setup(self, ctx: LoopContext) -> None:
        self.ref = Reference(ctx.model)
        self.head = attach_head(ctx, self.head_name)
        self.reward_model = RewardModel.load(self.p.reward_model, device=ctx.accelerator.device)

    def _sample(self, model: Any, prompts: list[list[int]]) -> Rollout:
        return sample(model, self.tokenizer, prompts, self.p.generation)

    def scores(self, messages: list[tuple[Message, ...]], texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """The sequence reward (reward model minus the length penalty), and its parts' batch sums."""
        p = self.p
        assert self.reward_model is not None
        rm = torch.tensor(self.reward_model.score(messages, texts))
        over = torch.tensor([max(0, len(t) - p.target_length) for t in texts], dtype=torch.float32)
        penalty = p.length_penalty * over
        return rm - penalty, {"r_model_sum": float(rm.sum()), "r_length_penalty_sum": float(penalty.sum())}

    def _ref_logps(self, model: Any, r: Rollout) -> torch.Tensor:
        assert self.ref is not None
        with self.ref.context(model):
            return completion_forward(self.ref.model(model), r)[0]

    def rollout_batch(self, ctx: LoopContext, items: list[PromptItem]) -> Experience:
        p, model = self.p, ctx.model
        r = self._sample(model, [i.ids for i in items])
        score, parts = self.scores([i.messages for i in items], r.texts)
        with eval_mode(model):  # the behaviour policy sampled without dropout; score it the same way
            old_logps, old_values, entropy = completion_forward(model, r, self.head)
        ref_logps = self._ref_logps(model, r)
        assert old_values is not None
        mask = r.completion_mask
        score = score.to(old_logps.device)
        rewards, kl = ppo_token_rewards(score, old_logps, ref_logps, mask, kl_coef=p.kl_coef)
        adv, ret = gae_advantages(rewards, old_values, mask, gamma=p.gamma, lam=p.lam)
        stats = {"prompts": float(len(items)), "samples": float(len(r.texts)), "reward_sum": float(score.sum()),
                 "kl_sum": float(kl.sum()), "entropy_sum": float((entropy * mask).sum()),
                 "len_sum": float(mask.sum()), **parts}
        return Experience(r, score, adv, old_logps, ref_logps, old_values, ret, stats)

    def collect(self, ctx: LoopContext, prompts: list[PromptItem]) -> Experience:
        exp = super().collect(ctx, prompts)
        exp.advantages = masked_whiten(exp.advantages, exp.rollout.completion_mask)  # over the whole step
        return exp

    def loss(self, model: Any, exp: Experience, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        p, mask = self.p, exp.rollout.completion_mask
        assert self.head is not None and exp.old_logps is not None
        assert exp.values is not None and exp.returns is not None
        logps, values, _ = completion_forward(model, exp.rollout, self.head)
        assert values is not None
        pl, pm = ppo_policy_loss(logps, exp.old_logps, exp.advantages, mask, clip_eps=p.clip_eps,
                                 num_tokens=num_tokens)
        vl, vm = ppo_value_loss(values, exp.values, exp.returns, mask, clip_range=p.value_clip,
                                num_tokens=num_tokens)
        t = float(mask.sum())
        return pl + p.vf_coef * vl, {
            "opt_tokens": t, "loss_sum": (pm["policy_loss"] + p.vf_coef * vm["value_loss"]) * t,
            "clipfrac_sum": pm["clipfrac"] * t, "approx_kl_sum": pm["approx_kl"] * t,
            "ratio_mean_sum": pm["ratio_mean"] * t, "value_loss_sum": vm["value_loss"] * t,
            "vf_clipfrac_sum": vm["vf_clipfrac"] * t,
        }

    def validate_batch(self, ctx: LoopContext, items: list[PromptItem]) -> dict[str, float]:
        r = self._sample(ctx.model, [i.ids for i in items])
        score, parts = self.scores([i.messages for i in items], r.texts)
        kl = (completion_forward(ctx.model, r)[0] - self._ref_logps(ctx.model, r)) * r.completion_mask
        return {"samples": float(len(r.texts)), "reward_sum": float(score.sum()), "kl_sum": float(kl.sum()),
                "len_sum": float(r.completion_mask.sum()), **parts}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = super().summarize(sums)
        if sums.get("samples"):
            out["kl"] = sums["kl_sum"] / sums["samples"]  # per sequence
        if sums.get("len_sum") and "entropy_sum" in sums:
            out["entropy"] = sums["entropy_sum"] / sums["len_sum"]  # per token
        return out

    def after_step(self, ctx: LoopContext) -> None:
        if ctx.is_main and self.head is not None:
            save_head(self.head, ctx.run_dir / "ppo_value_head.safetensors")  # not a reward model
