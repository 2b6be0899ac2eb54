"""Online RL over the shared loop in two explicit phases: roll out, then optimize (PPO and GRPO build on this).

One loop step, as in torchtune's PPO recipe and TRL's GRPO:
  1. `collect(ctx, prompts) -> Experience`: every prompt the loop handed this process is rolled out (in
     micro-batches of `train.batch_size` prompts): sampled, scored, and its tokens' log-probs under the
     sampling policy, the reference and (PPO) the value head recorded, then turned into advantages.
  2. `optimize(ctx, experience, epochs, minibatches)`: `epochs` passes over the experience, each in
     `minibatches` shuffled minibatches, one optimizer step per minibatch (accumulated in chunks of one
     rollout micro-batch, normalised by the minibatch's completion tokens over all processes, so memory is
     that of one micro-batch and accumulation equals one big minibatch). From the second optimizer step on
     the policy differs from the one that sampled, so the importance ratio moves off 1 and clipping acts.

Validation rolls out the validation prompts (one sample each, with a fixed seed so every evaluation sees the
same random stream and the training RNG is untouched) and reports their reward: higher is better.

A method supplies `_sample` (its one call into generation), `rollout_batch`, `loss` and `validate_batch`.
This module also holds what both share: prompt items, the `Rollout` of sampled tokens, `completion_forward`.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.records import Conversation, Message
from tunelab.data.templates import encode_prompt
from tunelab.model.parts import unwrap
from tunelab.train.dpo import is_peft
from tunelab.train.loop import (
    LoopContext,
    NonFiniteLoss,
    TrainingMethod,
    autocast,
    optimizer_step,
    reduce_sums,
)


@dataclass
class PromptItem:
    ids: list[int]
    messages: tuple[Message, ...]


def encode_prompt_item(tok: Any, record: Any, cfg: Any) -> PromptItem | None:
    """Any conversation-family record: its prompt is everything before the last assistant turn."""
    assert isinstance(record, Conversation)
    msgs = record.prompt or record.messages
    ids = encode_prompt(tok, list(msgs), cfg.data.system_prompt)
    if len(ids) > cfg.data.max_seq_len:
        ids = ids[-cfg.data.max_seq_len :]  # keep the end: the generation header must stay
    return PromptItem(ids, tuple(msgs))


@dataclass
class Rollout:
    input_ids: torch.Tensor  # (B, P + T): left-padded prompt, then completion (right-padded)
    attention_mask: torch.Tensor
    prompt_len: int
    completion_mask: torch.Tensor  # (B, T): completion tokens up to and including the first end-of-turn
    texts: list[str]

    @staticmethod
    def cat(parts: list[Rollout]) -> Rollout:
        """One rollout from several micro-batches: prompts re-left-padded, completions re-right-padded."""
        P = max(r.prompt_len for r in parts)
        T = max(r.completion_mask.size(1) for r in parts)

        def repad(r: Rollout, x: torch.Tensor) -> torch.Tensor:  # padded ids are 0: masked, never attended
            prompt, comp = x[:, : r.prompt_len], x[:, r.prompt_len :]
            return torch.cat([F.pad(prompt, (P - r.prompt_len, 0)), F.pad(comp, (0, T - comp.size(1)))], 1)

        return Rollout(
            torch.cat([repad(r, r.input_ids) for r in parts]), torch.cat([repad(r, r.attention_mask) for r in parts]),
            P, torch.cat([F.pad(r.completion_mask, (0, T - r.completion_mask.size(1))) for r in parts]),
            [t for r in parts for t in r.texts],
        )

    def select(self, idx: torch.Tensor) -> tuple[Rollout, int]:
        """Rows `idx`, trimmed of columns no selected row uses; also the completion width kept."""
        ids, att, cm = self.input_ids[idx], self.attention_mask[idx], self.completion_mask[idx]
        prompt_att = att[:, : self.prompt_len]
        lead = int((prompt_att.cumsum(-1) == 0).sum(-1).min())  # left-padding columns every row has
        width = max(1, int(cm.sum(-1).max()))
        end = self.prompt_len + width
        return Rollout(ids[:, lead:end], att[:, lead:end], self.prompt_len - lead, cm[:, :width],
                       [self.texts[i] for i in idx.tolist()]), width


@dataclass
class Experience:
    """What one rollout phase hands the optimize phase; one row per sampled completion."""

    rollout: Rollout  # the tokens
    rewards: torch.Tensor  # (B,) sequence reward (PPO: before the per-token KL charge)
    advantages: torch.Tensor  # (B,) per sequence (GRPO) or (B, T) per token (PPO)
    old_logps: torch.Tensor | None  # (B, T) under the sampling policy; None: one optimizer step, ratio is 1
    ref_logps: torch.Tensor | None = None  # (B, T) under the reference; None without a KL term
    values: torch.Tensor | None = None  # (B, T) value head at sampling time (PPO)
    returns: torch.Tensor | None = None  # (B, T) value targets (PPO)
    stats: dict[str, float] = field(default_factory=dict)  # rollout metric sums (reward_sum, len_sum, ...)

    def __len__(self) -> int:
        return int(self.rewards.numel())

    @property
    def num_tokens(self) -> int:
        return int(self.rollout.completion_mask.sum())

    @staticmethod
    def cat(parts: list[Experience]) -> Experience:
        T = max(p.rollout.completion_mask.size(1) for p in parts)

        def per_token(xs: list[torch.Tensor | None]) -> torch.Tensor | None:
            if any(x is None for x in xs):
                return None
            return torch.cat([F.pad(x, (0, T - x.size(1))) if x.dim() == 2 else x for x in xs if x is not None])

        stats: dict[str, float] = {}
        for p in parts:
            for k, v in p.stats.items():
                stats[k] = stats.get(k, 0.0) + v
        adv = per_token([p.advantages for p in parts])
        assert adv is not None
        return Experience(
            Rollout.cat([p.rollout for p in parts]), torch.cat([p.rewards for p in parts]), adv,
            per_token([p.old_logps for p in parts]), per_token([p.ref_logps for p in parts]),
            per_token([p.values for p in parts]), per_token([p.returns for p in parts]), stats,
        )

    def select(self, idx: torch.Tensor) -> Experience:
        idx = idx.to(self.rewards.device)
        r, width = self.rollout.select(idx)

        def rows(x: torch.Tensor | None) -> torch.Tensor | None:
            return None if x is None else x[idx][:, :width] if x.dim() == 2 else x[idx]

        adv = rows(self.advantages)
        assert adv is not None
        return Experience(r, self.rewards[idx], adv, rows(self.old_logps), rows(self.ref_logps), rows(self.values),
                          rows(self.returns))


@contextmanager
def eval_mode(model: Any) -> Iterator[None]:
    """Score the sampled tokens as the behaviour policy produced them: without dropout."""
    m = unwrap(model)
    was_training = m.training
    m.eval()
    try:
        yield
    finally:
        m.train(was_training)


def completion_forward(
    model: Any, r: Rollout, value_head: Any = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token log-probs of the completion tokens (B, T); with a value head, values at the same positions;
    and the (detached) per-token entropy of the policy there."""
    from tunelab.model.parts import backbone

    pos = (r.attention_mask.cumsum(-1) - 1).clamp(min=0)
    h = backbone(model)(input_ids=r.input_ids, attention_mask=r.attention_mask, position_ids=pos,
                        use_cache=False).last_hidden_state
    h = h[:, r.prompt_len - 1 : -1]  # the state that predicts each completion token
    base = unwrap(model).get_base_model() if is_peft(model) else unwrap(model)
    logits = base.get_output_embeddings()(h).float()
    targets = r.input_ids[:, r.prompt_len :]
    logps = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    values = value_head(h).float() if value_head is not None else None
    with torch.no_grad():
        p = torch.softmax(logits, -1)
        entropy = -(p * torch.log_softmax(logits, -1)).sum(-1)
    return logps * r.completion_mask, values, entropy


def _add(acc: dict[str, float], m: dict[str, float]) -> None:
    for k, v in m.items():
        acc[k] = acc.get(k, 0.0) + float(v)


# Metrics the optimize phase reports, each a mean over the completion tokens of every optimizer step.
OPT_METRICS = ("clipfrac", "approx_kl", "ratio_mean", "value_loss", "vf_clipfrac")


class RolloutMethod(TrainingMethod):
    expect = "conversation"
    valid_metric = "reward"
    higher_is_better = True

    @property
    def samples_per_prompt(self) -> int:
        """Completions sampled per prompt (GRPO's group)."""
        return 1

    # ---------------------------------------------------------------------- what a method supplies

    @property
    @abstractmethod
    def epochs(self) -> int:
        """Passes over each step's experience."""

    @property
    @abstractmethod
    def minibatches(self) -> int:
        """Shuffled minibatches (optimizer steps) per pass."""

    @abstractmethod
    def _sample(self, model: Any, prompts: list[list[int]]) -> Rollout:
        """Sample one completion per prompt (token ids): the method's one call into generation."""

    @abstractmethod
    def rollout_batch(self, ctx: LoopContext, items: list[PromptItem]) -> Experience:
        """Roll out one micro-batch of prompts (no gradients)."""

    @abstractmethod
    def loss(self, model: Any, exp: Experience, num_tokens: float) -> tuple[torch.Tensor, dict[str, float]]:
        """The objective on one chunk of experience, normalised by `num_tokens`, and token-weighted metric sums
        (`opt_tokens`, `loss_sum`, `<metric>_sum` for OPT_METRICS)."""

    @abstractmethod
    def validate_batch(self, ctx: LoopContext, items: list[PromptItem]) -> dict[str, float]:
        """Metric sums for one micro-batch of validation prompts (`samples`, `reward_sum`, ...)."""

    # ---------------------------------------------------------------------- the two phases

    def encode(self, record: Any) -> PromptItem | None:
        return encode_prompt_item(self.tokenizer, record, self.cfg)

    @property
    def optimizer_steps_per_step(self) -> int:
        return self.epochs * self.minibatches

    def run_step(self, ctx: LoopContext, mbs: list[list[Any]]) -> dict[str, float]:
        exp = self.collect(ctx, [item for mb in mbs for item in mb])
        ctx.state.tokens_seen += int(exp.rollout.attention_mask.sum())
        sums = dict(exp.stats)
        norms = self.optimize(ctx, exp, self.epochs, self.minibatches, sums)
        out = reduce_sums(ctx, sums)
        if norms:
            out["grad_norm"] = sum(norms) / len(norms)
        return out

    @torch.no_grad()
    def collect(self, ctx: LoopContext, prompts: list[PromptItem]) -> Experience:
        bs = ctx.cfg.train.batch_size
        with autocast(ctx):
            parts = [self.rollout_batch(ctx, prompts[j : j + bs]) for j in range(0, len(prompts), bs)]
        return Experience.cat(parts)

    def optimize(self, ctx: LoopContext, exp: Experience, epochs: int, minibatches: int,
                 sums: dict[str, float]) -> list[float]:
        """`epochs` passes over `exp` in shuffled minibatches, one optimizer step each; metric sums are added to
        `sums`. Returns the gradient norms of the steps (empty when clipping is off)."""
        n = len(exp)
        chunk = ctx.cfg.train.batch_size * self.samples_per_prompt
        g = torch.Generator().manual_seed(ctx.cfg.train.seed * 1_000_003 + ctx.state.step)  # resumable order
        norms: list[float] = []
        ctx.model.train()
        for _ in range(epochs):
            order = torch.randperm(n, generator=g)
            for idx in torch.tensor_split(order, min(minibatches, n)):
                gn = self._minibatch_step(ctx, exp, idx, chunk, sums)
                if gn is not None:
                    norms.append(gn)
        return norms

    def _minibatch_step(self, ctx: LoopContext, exp: Experience, idx: torch.Tensor, chunk: int,
                        sums: dict[str, float]) -> float | None:
        acc, model = ctx.accelerator, ctx.model
        parts = [exp.select(idx[j : j + chunk]) for j in range(0, len(idx), chunk)]
        total = reduce_sums(ctx, {"n": float(sum(p.num_tokens for p in parts))})["n"]
        norm = max(total, 1.0) / acc.num_processes  # DDP averages gradients: this turns it into a sum
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            with (nullcontext() if last else acc.no_sync(model)), autocast(ctx):
                loss, m = self.loss(model, part, norm)
            if not torch.isfinite(loss):
                raise NonFiniteLoss(ctx.state.step + 1)
            acc.backward(loss)
            _add(sums, m)
        sums["optimizer_steps"] = sums.get("optimizer_steps", 0.0) + 1.0 / acc.num_processes
        return optimizer_step(ctx)

    @torch.no_grad()
    def validate(self, ctx: LoopContext) -> dict[str, float]:
        acc = ctx.accelerator
        items = ctx.valid_items[acc.process_index :: acc.num_processes]
        bs = ctx.cfg.train.batch_size
        dev = acc.device
        sums: dict[str, float] = {}
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if dev.type == "cuda" else [],
                                   device_type=dev.type):
            torch.manual_seed(ctx.cfg.train.seed)
            with eval_mode(ctx.model), autocast(ctx):
                for j in range(0, len(items), bs):
                    _add(sums, self.validate_batch(ctx, items[j : j + bs]))
        out = self.summarize(reduce_sums(ctx, sums))
        out.pop("loss", None)
        return out

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        """Per-sample means of the rollout metrics, per-token means of the optimize phase's."""
        out: dict[str, float] = {}
        t = sums.get("opt_tokens", 0.0)
        if t:
            out["loss"] = sums["loss_sum"] / t
            for k in OPT_METRICS:
                if f"{k}_sum" in sums:
                    out[k] = sums[f"{k}_sum"] / t
        s = sums.get("samples", 0.0)
        if s:
            out["reward"] = sums["reward_sum"] / s
            out["completion_tokens"] = sums.get("len_sum", 0.0) / s
            for k, v in sums.items():
                if k.startswith("r_") and k.endswith("_sum"):
                    out[k[:-4]] = v / s
        for k in ("prompts", "optimizer_steps"):
            if k in sums:
                out[k] = sums[k]
        return out
