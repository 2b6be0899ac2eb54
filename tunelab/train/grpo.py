"""GRPO over the shared loop (Shao et al. 2024): for each prompt sample a group of completions, score them with
reward functions (or a reward model), and push up the log-probs of completions that beat their group's mean.
No value model. A KL penalty (k3 estimator) against the reference -- the same model with adapters disabled --
keeps the policy close to where it started.

Each step rolls out every prompt it is handed, `group_size` times (tunelab/train/rollout.py: collect, then
optimize). With `grpo.num_iterations` > 1 (or several `num_minibatches`) the same rollout feeds several
optimizer steps and the log-probs recorded at sampling time are the old policy's, so the importance ratio
moves off 1 and `clip_eps` bounds it (TRL's num_iterations); with one optimizer step per rollout the ratio is
exactly 1 and clipping does nothing (the log-probs at sampling time are then not even computed).

Also home of sampling completions (`sample`, used by PPO too) and the built-in reward functions
(`REWARD_FUNCTIONS`: json_valid, json_schema, regex, length). With `grpo.grader` an OpenAI grader
(tunelab/graders) scores too: each prompt carries its data row's extra fields (the grader's `item`), read from
`<data file>.items.jsonl` by line (the jobs API writes it from a reinforcement training file); model graders use
TUNELAB_GRADER_BASE_URL's endpoint if set, else the model being trained with its adapters off (the base).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tunelab.data.records import Message
from tunelab.model.parts import unwrap
from tunelab.rl_losses import grpo_advantages, grpo_loss, k3_kl, masked_mean
from tunelab.train.dpo import Reference
from tunelab.train.loop import LoopContext
from tunelab.train.rollout import (
    Experience,
    PromptItem,
    Rollout,
    RolloutMethod,
    completion_forward,
    eval_mode,
)

# ------------------------------------------------------------------------------------------ reward functions


def json_valid(text: str) -> float:
    """1 if the completion parses as a JSON object or array, else 0."""
    try:
        return float(isinstance(json.loads(text.strip()), dict | list))
    except ValueError:
        return 0.0


def json_schema_reward(schema: dict[str, Any]) -> Callable[[str], float]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(schema)

    def f(text: str) -> float:
        try:
            obj = json.loads(text.strip())
        except ValueError:
            return 0.0
        return float(validator.is_valid(obj))

    return f


def regex_reward(pattern: str) -> Callable[[str], float]:
    rx = re.compile(pattern)
    return lambda text: float(rx.search(text) is not None)


def length_reward(max_chars: int) -> Callable[[str], float]:
    """1 up to max_chars, then falling linearly to 0 at twice that."""
    return lambda text: max(0.0, min(1.0, 2.0 - len(text) / max_chars))


REWARD_FUNCTIONS = ("json_valid", "json_schema", "regex", "length")


def build_reward(spec: Any) -> Callable[[str], float]:
    if spec.fn == "json_valid":
        return json_valid
    if spec.fn == "json_schema":
        return json_schema_reward(spec.json_schema)
    if spec.fn == "regex":
        return regex_reward(spec.pattern)
    if spec.fn == "length":
        return length_reward(spec.max_chars)
    raise ValueError(spec.fn)


# ------------------------------------------------------------------------------------------ sampling


@torch.no_grad()
def sample(model: Any, tok: Any, prompts: list[list[int]], gen: Any) -> Rollout:
    """Rollouts through the engine's sampler: the stop rule (the template's end-of-turn marker) of every path."""
    from tunelab.engine.sync import sample_rollouts

    r = sample_rollouts(unwrap(model), tok, prompts, max_tokens=gen.max_new_tokens, temperature=gen.temperature,
                        top_k=gen.top_k)
    return Rollout(r.input_ids, r.attention_mask, r.prompt_len, r.completion_mask, r.texts)


# ------------------------------------------------------------------------------------------ grader items


@dataclass
class GradedItem(PromptItem):
    """A prompt with its data row's extra fields, for an OpenAI grader's `{{item.*}}`."""

    item: dict[str, Any] = field(default_factory=dict)
    where: str = ""


def read_items(data_file: str) -> list[dict[str, Any]]:
    """The items file of a data file (`train.jsonl` -> `train.items.jsonl`), one object per data line; none: []."""
    path = Path(data_file).with_suffix(".items.jsonl")
    if not path.is_file():
        return []
    return [json.loads(ln) if ln.strip() else {} for ln in path.read_text(encoding="utf-8").splitlines()]


# ------------------------------------------------------------------------------------------ the method


class GRPO(RolloutMethod):
    name = "grpo"

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        assert cfg.grpo is not None  # the config refuses method grpo without a grpo section
        self.g = g = cfg.grpo
        self.fns = [(s.fn, s.weight, build_reward(s)) for s in g.rewards]
        self.ref: Reference | None = None
        self.reward_model: Any = None
        self.grader: Any = None
        self._items: dict[str, list[dict[str, Any]]] = {}

    @property
    def samples_per_prompt(self) -> int:
        return int(self.g.group_size)

    @property
    def epochs(self) -> int:
        return int(self.g.num_iterations)

    @property
    def minibatches(self) -> int:
        return int(self.g.num_minibatches)

    def encode(self, record: Any) -> PromptItem | None:
        base = super().encode(record)
        if base is None or self.g.grader is None or record.source is None:
            return base
        f, line = record.source.file, record.source.line
        if f not in self._items:
            self._items[f] = read_items(f)
        rows = self._items[f]
        item = rows[line - 1] if 0 < line <= len(rows) else {}
        return GradedItem(base.ids, base.messages, item, f"{Path(f).name} line {line}")

    def setup(self, ctx: LoopContext) -> None:
        model_graders = False
        if self.g.grader is not None:
            from tunelab.graders import parse_grader
            from tunelab.graders.model import env_chat
            from tunelab.graders.runtime import Grader

            spec = parse_grader(self.g.grader, "grpo.grader")
            chat = env_chat()
            dumped = json.dumps(self.g.grader)
            model_graders = chat is None and ('"score_model"' in dumped or '"label_model"' in dumped)
            self.grader = Grader(spec, chat=chat or (lambda model, batch, sp: self._base_chat(ctx, batch, sp)),
                                 timeout_s=self.g.grader_timeout_s, memory_mb=self.g.grader_memory_mb)
        if self.g.kl_coef > 0 or model_graders:
            self.ref = Reference(ctx.model)
        if self.g.reward_model:
            from tunelab.train.reward import RewardModel

            self.reward_model = RewardModel.load(self.g.reward_model, device=ctx.accelerator.device)

    def _sample(self, model: Any, prompts: list[list[int]]) -> Rollout:
        return sample(model, self.tokenizer, prompts, self.g.generation)

    def _base_chat(self, ctx: LoopContext, batch: list[list[dict[str, str]]], sp: Any) -> list[str]:
        """A model grader's answers from the base model (the policy with its adapters off)."""
        from tunelab.data.templates import encode_prompt
        from tunelab.engine.sync import sample_rollouts

        assert self.ref is not None
        prompts = [encode_prompt(self.tokenizer, [Message(m["role"], m["content"]) for m in msgs]) for msgs in batch]
        temperature = (sp.temperature if sp is not None and sp.temperature else None) or 1e-3
        max_tokens = (sp.max_completions_tokens if sp is not None else None) or 16
        with self.ref.context(ctx.model), eval_mode(ctx.model):
            return sample_rollouts(unwrap(self.ref.model(ctx.model)), self.tokenizer, prompts, max_tokens=max_tokens,
                                   temperature=temperature).texts

    def score(self, messages: list[tuple[Message, ...]], texts: list[str],
              prompts: list[PromptItem] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of the reward functions (and the reward model, and the grader), plus each one's batch
        sum for logging."""
        total = torch.zeros(len(texts))
        parts: dict[str, float] = {}
        if self.grader is not None:
            from tunelab.graders import GraderError

            items = [p.item if isinstance(p, GradedItem) else {} for p in prompts or [None] * len(texts)]  # type: ignore[list-item]
            try:
                scores, sub = self.grader.grade(texts, items)
            except GraderError as e:
                wheres = sorted({p.where for p in prompts or [] if isinstance(p, GradedItem)})
                shown = f" (grading completions of {', '.join(wheres[:3])})" if wheres else ""
                raise GraderError(e.message + shown, e.param) from None
            v = torch.tensor(scores)
            total += v
            parts["r_grader_sum"] = float(v.sum())
            for k, vals in sub.items():
                parts[f"r_{k}_sum"] = float(sum(vals))
        for name, w, f in self.fns:
            v = torch.tensor([f(t) for t in texts])
            total += w * v
            parts[f"r_{name}_sum"] = float(v.sum())
        if self.reward_model is not None:
            v = torch.tensor(self.reward_model.score(messages, texts))
            total += v
            parts["r_model_sum"] = float(v.sum())
        return total, parts

    def _ref_logps(self, model: Any, r: Rollout) -> torch.Tensor | None:
        if self.ref is None:
            return None
        with self.ref.context(model):
            return completion_forward(self.ref.model(model), r)[0]

    def rollout_batch(self, ctx: LoopContext, items: list[PromptItem]) -> Experience:
        G, model = self.g.group_size, ctx.model
        r = self._sample(model, [i.ids for i in items for _ in range(G)])
        rewards, parts = self.score([i.messages for i in items for _ in range(G)], r.texts,
                                    [i for i in items for _ in range(G)])
        dev = r.input_ids.device
        old = None
        if self.optimizer_steps_per_step > 1:  # reused: the ratio against the sampling policy matters
            with eval_mode(model):
                old = completion_forward(model, r)[0]
        stats = {"prompts": float(len(items)), "samples": float(len(r.texts)), "reward_sum": float(rewards.sum()),
                 "len_sum": float(r.completion_mask.sum()), **parts}
        return Experience(r, rewards.to(dev), grpo_advantages(rewards, G).to(dev), old, self._ref_logps(model, r),
                          stats=stats)

    def loss(self, model: Any, exp: Experience, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        g, mask = self.g, exp.rollout.completion_mask
        logps, _, _ = completion_forward(model, exp.rollout)
        old = exp.old_logps if exp.old_logps is not None else logps.detach()
        loss, m = grpo_loss(logps, old, exp.ref_logps, exp.advantages, mask, clip_eps=g.clip_eps,
                            kl_coef=g.kl_coef, num_tokens=num_tokens)
        t = float(mask.sum())
        out = {"opt_tokens": t, "loss_sum": (m["policy_loss"] + g.kl_coef * m.get("kl", 0.0)) * t,
               "clipfrac_sum": m["clipfrac"] * t, "approx_kl_sum": m["approx_kl"] * t,
               "ratio_mean_sum": m["ratio_mean"] * t}
        if "kl" in m:
            out.update(kl_sum=m["kl"] * t, kl_tokens=t)
        return loss, out

    def validate_batch(self, ctx: LoopContext, items: list[PromptItem]) -> dict[str, float]:
        r = self._sample(ctx.model, [i.ids for i in items])
        rewards, parts = self.score([i.messages for i in items], r.texts, items)
        out = {"samples": float(len(r.texts)), "reward_sum": float(rewards.sum()),
               "len_sum": float(r.completion_mask.sum()), **parts}
        ref = self._ref_logps(ctx.model, r)
        if ref is not None:
            mask, t = r.completion_mask, float(r.completion_mask.sum())
            out.update(kl_sum=float(masked_mean(k3_kl(completion_forward(ctx.model, r)[0], ref), mask)) * t,
                       kl_tokens=t)
        return out

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        out = super().summarize(sums)
        if sums.get("kl_tokens"):
            out["kl"] = sums["kl_sum"] / sums["kl_tokens"]  # k3, per completion token
        return out
