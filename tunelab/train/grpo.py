"""GRPO over the shared loop (Shao et al. 2024): for each prompt sample a group of completions, score them with
reward functions (or a reward model), and push up the log-probs of completions that beat their group's mean.
No value model. A KL penalty (k3 estimator) against the reference -- the same model with adapters disabled --
keeps the policy close to where it started.

Also home of what PPO shares: sampling completions (`sample`), scoring their tokens (`completion_forward`),
and the built-in reward functions (`REWARD_FUNCTIONS`: json_valid, json_schema, regex, length).

One rollout feeds one optimizer step, so the policy that sampled is the policy being updated (the importance
ratio is exactly 1 and clipping only matters for the KL term); PPO shows the multi-epoch variant.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.records import Conversation, Message
from tunelab.data.templates import encode_prompt
from tunelab.preference_losses import grpo_advantages, grpo_loss
from tunelab.train.dpo import Reference, is_peft, unwrap
from tunelab.train.loop import LoopContext, Method

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


# ------------------------------------------------------------------------------------------ rollouts


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


@torch.no_grad()
def sample(model: Any, tok: Any, prompts: list[list[int]], gen: Any) -> Rollout:
    """Rollouts through the engine's sampler: the stop rule (the template's end-of-turn marker) of every path."""
    from tunelab.engine.sync import sample_rollouts

    r = sample_rollouts(unwrap(model), tok, prompts, max_tokens=gen.max_new_tokens, temperature=gen.temperature,
                        top_k=gen.top_k)
    return Rollout(r.input_ids, r.attention_mask, r.prompt_len, r.completion_mask, r.texts)


def completion_forward(
    model: Any, r: Rollout, value_head: Any = None
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Per-token log-probs of the completion tokens (B, T); with a value head, values at the same positions;
    and the (detached) per-token entropy of the policy there."""
    from tunelab.train.reward import backbone

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


# ------------------------------------------------------------------------------------------ the method


class GRPO(Method):
    name = "grpo"
    expect = "conversation"

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        assert cfg.grpo is not None  # the config refuses method grpo without a grpo section
        self.g = g = cfg.grpo
        self.fns = [(s.fn, s.weight, build_reward(s)) for s in g.rewards]
        self.ref: Reference | None = None
        self.reward_model: Any = None

    def encode(self, record: Any) -> PromptItem | None:
        return encode_prompt_item(self.tokenizer, record, self.cfg)

    def collate(self, items: list[Any]) -> dict[str, Any]:
        # Prompts are generated from inside `loss`; the batch carries them as plain lists.
        return {"prompts": [i.ids for i in items], "messages": [i.messages for i in items],
                "num_prompts": torch.tensor(len(items))}

    def count(self, batch: dict[str, Any]) -> int:
        return int(batch["num_prompts"])

    def setup(self, ctx: LoopContext) -> None:
        if self.g.kl_coef > 0:
            self.ref = Reference(ctx.model)
        if self.g.reward_model:
            from tunelab.train.reward import RewardModel

            self.reward_model = RewardModel.load(self.g.reward_model, device=ctx.accelerator.device)

    def score(self, messages: list[tuple[Message, ...]], texts: list[str]) -> tuple[torch.Tensor, dict[str, float]]:
        """Weighted sum of the reward functions (and the reward model), plus each one's batch sum for logging."""
        total = torch.zeros(len(texts))
        parts: dict[str, float] = {}
        for name, w, f in self.fns:
            v = torch.tensor([f(t) for t in texts])
            total += w * v
            parts[f"r_{name}_sum"] = float(v.sum())
        if self.reward_model is not None:
            v = torch.tensor(self.reward_model.score(messages, texts))
            total += v
            parts["r_model_sum"] = float(v.sum())
        return total, parts

    def loss(self, model: Any, batch: dict[str, Any], num_items: float) -> tuple[torch.Tensor, dict[str, float]]:
        g = self.g
        n = int(batch["num_prompts"])
        training = torch.is_grad_enabled()
        group = g.group_size if training else 1
        prompts = [p for p in batch["prompts"] for _ in range(group)]
        messages = [m for m in batch["messages"] for _ in range(group)]
        r = sample(model, self.tokenizer, prompts, g.generation)
        rewards, parts = self.score(messages, r.texts)
        stats = {"items": float(n), "samples": float(len(r.texts)), "reward_sum": float(rewards.sum()),
                 "len_sum": float(r.completion_mask.sum()), **parts}
        if not training:  # validation: how good are sampled completions? (lower loss = higher reward)
            return -rewards.mean(), {**stats, "loss_sum": -float(rewards.sum())}
        adv = grpo_advantages(rewards, group).to(r.input_ids.device)
        ref_logps = None
        if self.ref is not None:
            with torch.no_grad(), self.ref.context(model):
                ref_logps, _, _ = completion_forward(self.ref.model(model), r)
        logps, _, _ = completion_forward(model, r)
        loss, m = grpo_loss(logps, logps.detach(), ref_logps, adv, r.completion_mask, clip_eps=g.clip_eps,
                            kl_coef=g.kl_coef)
        scaled = loss * (n / num_items)  # the loss is a per-token mean over this micro-batch's prompts
        return scaled, {**stats, "loss_sum": float(loss.detach()) * n, "kl_sum": m.get("kl", 0.0) * n}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        s = max(sums.get("samples", 0.0), 1.0)
        out = {"loss": sums.get("loss_sum", 0.0) / n, "reward": sums.get("reward_sum", 0.0) / s,
               "completion_tokens": sums.get("len_sum", 0.0) / s}
        if "kl_sum" in sums:
            out["kl"] = sums["kl_sum"] / n
        for k, v in sums.items():
            if k.startswith("r_") and k.endswith("_sum"):
                out[k[:-4]] = v / s
        return out
