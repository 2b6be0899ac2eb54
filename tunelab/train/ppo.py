"""PPO, RLHF's stage 3, over the shared loop (Ouyang et al. 2022; Schulman et al. 2017).

Per rollout: sample one completion per prompt from the policy; score it with the trained reward model
(`ppo.reward_model`, a `method: reward` run) minus an optional length penalty; charge
`kl_coef * (log pi - log pi_ref)` at every token (the reference is the policy with adapters disabled, or a
frozen copy for full fine-tuning); turn those rewards into advantages with GAE using a value head on the
policy's hidden states. Then `ppo.ppo_epochs` optimizer steps reuse the same rollout with the clipped
surrogate and clipped value losses, which is where the ratio moves away from 1 and clipping matters.

Because a rollout is reused for several steps, the prompts the loop hands over on reuse steps are not
sampled: the loop's data order decides which prompts start each new rollout.
Logged: reward (reward model), score (after length penalty), kl, entropy, clipfrac, value_loss.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.preference_losses import (
    gae_advantages,
    masked_mean,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)
from tunelab.train.dpo import Reference, unwrap
from tunelab.train.grpo import PromptItem, Rollout, completion_forward, encode_prompt_item, sample
from tunelab.train.loop import LoopContext, Method
from tunelab.train.reward import HeadCheckpointMixin, RewardModel, ScalarHead, attach_head, save_head


@dataclass
class Experience:
    rollout: Rollout
    old_logps: torch.Tensor
    old_values: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    stats: dict[str, float]
    uses: int = 0


class PPO(HeadCheckpointMixin, Method):
    name = "ppo"
    expect = "conversation"
    head_name = "tunelab_value_head"

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        assert cfg.ppo is not None  # the config refuses method ppo without a ppo section
        self.p = cfg.ppo
        self.ref: Reference | None = None
        self.head: ScalarHead | None = None
        self.reward_model: RewardModel | None = None
        self.buffer: dict[int, Experience] = {}
        self.calls = 0

    def encode(self, record: Any) -> PromptItem | None:
        return encode_prompt_item(self.tokenizer, record, self.cfg)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        return {"prompts": [i.ids for i in items], "messages": [i.messages for i in items],
                "num_prompts": torch.tensor(len(items))}

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["num_prompts"])

    def setup(self, ctx: LoopContext) -> None:
        assert self.cfg.ppo is not None
        self.ref = Reference(ctx.model)
        self.head = attach_head(ctx, self.head_name)
        self.reward_model = RewardModel.load(self.cfg.ppo.reward_model, device=ctx.accelerator.device)

    def scores(self, messages: list[Any], texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(reward-model scores, scores after the length penalty)."""
        p = self.p
        assert self.reward_model is not None
        rm = torch.tensor(self.reward_model.score(messages, texts))
        over = torch.tensor([max(0, len(t) - p.target_length) for t in texts], dtype=torch.float32)
        return rm, rm - p.length_penalty * over

    @torch.no_grad()
    def experience(self, model: Any, batch: dict[str, Any]) -> Experience:
        p = self.p
        assert p is not None and self.ref is not None
        r = sample(model, self.tokenizer, batch["prompts"], p.generation)
        rm, score = self.scores(batch["messages"], r.texts)
        m = unwrap(model)
        was_training = m.training
        m.eval()  # the behaviour policy sampled without dropout; score it the same way
        old_logps, old_values, entropy = completion_forward(model, r, self.head)
        m.train(was_training)
        with self.ref.context(model):
            ref_logps, _, _ = completion_forward(self.ref.model(model), r)
        assert old_values is not None
        mask = r.completion_mask
        rewards, kl = ppo_token_rewards(score.to(old_logps.device), old_logps, ref_logps, mask, kl_coef=p.kl_coef)
        adv, ret = gae_advantages(rewards, old_values, mask, gamma=p.gamma, lam=p.lam)
        n = len(r.texts)
        stats = {"reward_sum": float(rm.sum()), "score_sum": float(score.sum()), "kl_sum": float(kl.sum()),
                 "entropy_sum": float(masked_mean(entropy, mask)) * n, "len_sum": float(mask.sum()),
                 "samples": float(n)}
        return Experience(r, old_logps, old_values, masked_whiten(adv, mask), ret, stats)

    def loss(self, model: Any, batch: dict[str, Any], num_items: float) -> tuple[torch.Tensor, dict[str, float]]:
        p = self.p
        assert p is not None and self.head is not None
        n = int(batch["num_prompts"])
        if not torch.is_grad_enabled():  # validation: mean reward of fresh samples and their KL
            exp = self.experience(model, batch)
            return torch.tensor(-exp.stats["score_sum"] / n), {
                **exp.stats, "items": float(n), "loss_sum": -exp.stats["score_sum"]}
        slot = self.calls % self.cfg.train.grad_accum  # which micro-batch of the optimizer step this is
        self.calls += 1
        old = self.buffer.get(slot)
        exp = old if old is not None and old.uses < p.ppo_epochs else self.experience(model, batch)
        self.buffer[slot] = exp
        exp.uses += 1
        n = len(exp.rollout.texts)
        logps, values, _ = completion_forward(model, exp.rollout, self.head)
        assert values is not None
        mask = exp.rollout.completion_mask
        pl, pm = ppo_policy_loss(logps, exp.old_logps, exp.advantages, mask, clip_eps=p.clip_eps)
        vl, vm = ppo_value_loss(values, exp.old_values, exp.returns, mask, clip_range=p.value_clip)
        loss = pl + p.vf_coef * vl
        fresh = exp.uses == 1  # report rollout statistics once per rollout, not once per reuse
        stats = exp.stats if fresh else {}
        return loss * (n / num_items), {
            **stats, "items": float(n), "loss_sum": float(loss.detach()) * n,
            "clipfrac_sum": pm["clipfrac"] * n, "approx_kl_sum": pm["approx_kl"] * n, "value_loss_sum": vm["value_loss"] * n,
        }

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        out = {"loss": sums.get("loss_sum", 0.0) / n}
        for k in ("clipfrac", "approx_kl", "value_loss"):
            if f"{k}_sum" in sums:
                out[k] = sums[f"{k}_sum"] / n
        s = sums.get("samples", 0.0)
        if s:
            for k in ("reward", "score", "kl", "entropy"):
                out[k] = sums[f"{k}_sum"] / s
            out["completion_tokens"] = sums["len_sum"] / s
        return out

    def after_step(self, ctx: LoopContext) -> None:
        if ctx.is_main and self.head is not None:
            save_head(self.head, ctx.run_dir / "ppo_value_head.safetensors")  # not a reward model
