"""Reward model (RLHF stage 2) over the shared loop, and loading/scoring a trained one.

The reward model is the base model (with LoRA, QLoRA or full weights, like any run) plus a scalar head: a
linear layer on the final hidden state of the last token of `prompt + response`. It trains on preference
pairs with the Bradley-Terry loss: -log sigmoid(r(chosen) - r(rejected)).

The run folder is an ordinary run (adapter/ or model/, config.yaml, tokenizer/) plus `value_head.safetensors`.
`RewardModel.load(run_dir)` brings it back; `tunelab reward score` and PPO/GRPO use it.

The head is attached in `setup` (after the loop built the optimizer), so it is registered on the model and
added to the optimizer as its own parameter group with the same schedule: `attach_head` does both.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunelab.data.records import Conversation, Message, Preference
from tunelab.data.templates import Encoded, encode
from tunelab.model.parts import backbone, unwrap
from tunelab.preference_losses import reward_loss
from tunelab.train.loop import LoopContext, Method, lr_lambda

HEAD_FILE = "value_head.safetensors"


class ScalarHead(nn.Module):
    """hidden state -> one number. Zero-initialised, so every reward and value starts at exactly 0."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = nn.Linear(hidden, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.linear(h.to(self.linear.weight.dtype)).squeeze(-1)


def hidden_size(model: Any) -> int:
    m = unwrap(model)
    cfg = m.get_base_model().config if hasattr(m, "get_base_model") else m.config
    return int(cfg.get_text_config().hidden_size)


def attach_head(ctx: LoopContext, name: str) -> ScalarHead:
    """Create a head, register it on the model (so clipping and device moves see it) and give it to the
    optimizer and LR schedule as an extra parameter group."""
    dev = next(unwrap(ctx.model).parameters()).device
    head = ScalarHead(hidden_size(ctx.model)).to(dev)
    unwrap(ctx.model).add_module(name, head)
    lr = ctx.cfg.train.lr
    ctx.optimizer.add_param_group({"params": list(head.parameters()), "lr": lr, "initial_lr": lr, "weight_decay": 0.0})
    sch = ctx.scheduler
    sch.base_lrs.append(lr)
    sch.lr_lambdas.append(lr_lambda(ctx.cfg, ctx.total_optimizer_steps))
    ctx.optimizer.param_groups[-1]["lr"] = lr * sch.lr_lambdas[-1](sch.last_epoch)
    sch._last_lr = [g["lr"] for g in ctx.optimizer.param_groups]
    return head


class HeadCheckpointMixin:
    """For methods with a scalar head outside the adapter: the head goes into every checkpoint and comes back
    on resume (the loop calls these; see Method.extra_state)."""

    head: ScalarHead | None

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {} if self.head is None else {f"head.{k}": v for k, v in self.head.state_dict().items()}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.head is not None and state:
            self.head.load_state_dict({k[len("head."):]: v for k, v in state.items() if k.startswith("head.")})


def save_head(head: ScalarHead, path: Path) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().float().cpu().contiguous() for k, v in head.state_dict().items()}, str(path))


def last_token_scores(model: Any, head: ScalarHead, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Scalar per row of a right-padded batch, read at each row's last real token."""
    h = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
    last = attention_mask.sum(-1) - 1
    return head(h[torch.arange(h.size(0), device=h.device), last])


def right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def encode_full(tok: Any, conv: Conversation, max_len: int, system_prompt: str | None) -> Encoded:
    return encode(tok, conv, train_on="all", max_len=max_len, system_prompt=system_prompt)


class Reward(HeadCheckpointMixin, Method):
    name = "reward"
    expect = "preference"
    head_name = "tunelab_reward_head"

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        self.head: ScalarHead | None = None

    def encode(self, record: Any) -> tuple[Encoded, Encoded]:
        assert isinstance(record, Preference)
        d = self.cfg.data
        c, r = record.as_conversations()
        return (encode_full(self.tokenizer, c, d.max_seq_len, d.system_prompt),
                encode_full(self.tokenizer, r, d.max_seq_len, d.system_prompt))

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        ids, mask = right_pad([c.input_ids for c, _ in items] + [r.input_ids for _, r in items],
                              int(self.tokenizer.pad_token_id))
        return {"input_ids": ids, "attention_mask": mask, "pairs": torch.tensor(len(items)), "num_tokens": mask.sum()}

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pairs"])

    def setup(self, ctx: LoopContext) -> None:
        self.head = attach_head(ctx, self.head_name)
        self.run_dir = ctx.run_dir

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> tuple[torch.Tensor, dict[str, float]]:
        assert self.head is not None
        scores = last_token_scores(model, self.head, batch["input_ids"], batch["attention_mask"])
        b = int(batch["pairs"])
        loss, m = reward_loss(scores[:b], scores[b:], center_coef=self.cfg.reward.center_coef, num_items=num_items)
        return loss, {"loss_sum": float(loss.detach()) * num_items, "items": float(b),
                      "acc_sum": m["rewards/accuracy"] * b, "margin_sum": m["rewards/margin"] * b}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        return {"loss": sums.get("loss_sum", 0.0) / n, "accuracy": sums.get("acc_sum", 0.0) / n,
                "margin": sums.get("margin_sum", 0.0) / n}

    def after_step(self, ctx: LoopContext) -> None:
        # The adapter/model folder is written by the loop; the head, a few KB, is written next to it every step
        # so the run folder is loadable whenever training stops.
        if ctx.is_main and self.head is not None:
            save_head(self.head, ctx.run_dir / HEAD_FILE)


class RewardModel:
    """A trained reward model, ready to score (prompt, response) pairs."""

    def __init__(self, model: Any, tokenizer: Any, head: ScalarHead, max_len: int = 1024,
                 system_prompt: str | None = None) -> None:
        self.model, self.tokenizer, self.head = model.eval(), tokenizer, head.eval()
        self.max_len, self.system_prompt = max_len, system_prompt

    @classmethod
    def load(cls, run_dir: str | Path, device: str | torch.device | None = None) -> RewardModel:
        from safetensors.torch import load_file

        from tunelab.errors import TunelabError
        from tunelab.model.adapters import load_for_inference, read_run_config

        p = Path(run_dir)
        if not (p / HEAD_FILE).exists():
            raise TunelabError(f"{p}: not a reward model run (no {HEAD_FILE}; train one with `method: reward`)", 2)
        model, tok, _ = load_for_inference(str(p))
        sd = load_file(str(p / HEAD_FILE))
        head = ScalarHead(int(sd["linear.weight"].shape[1]))
        head.load_state_dict(sd)
        data = read_run_config(p).get("data", {})
        if device is not None:
            model, head = model.to(device), head.to(device)
        else:
            head = head.to(next(model.parameters()).device)
        for q in model.parameters():
            q.requires_grad_(False)
        return cls(model, tok, head, int(data.get("max_seq_len", 1024)), data.get("system_prompt"))

    @torch.no_grad()
    def score_conversations(self, convs: list[Conversation], batch_size: int = 16) -> list[float]:
        out: list[float] = []
        dev = next(self.model.parameters()).device
        for j in range(0, len(convs), batch_size):
            encs = [encode_full(self.tokenizer, c, self.max_len, self.system_prompt) for c in convs[j : j + batch_size]]
            ids, mask = right_pad([e.input_ids for e in encs], int(self.tokenizer.pad_token_id))
            out.extend(last_token_scores(self.model, self.head, ids.to(dev), mask.to(dev)).float().tolist())
        return out

    def score(self, prompts: list[tuple[Message, ...]], responses: list[str]) -> list[float]:
        convs = [Conversation(tuple(p) + (Message("assistant", r),)) for p, r in zip(prompts, responses, strict=True)]
        return self.score_conversations(convs)


def score_file(run_dir: str | Path, data: str | Path) -> dict[str, Any]:
    """Score every example of a JSONL file: preference pairs (both sides, plus accuracy) or conversations."""
    from tunelab.data.readers import read_records

    rm = RewardModel.load(run_dir)
    recs = read_records(data)
    prefs = [r for r in recs if isinstance(r, Preference)]
    if prefs:
        convs = [c for p in prefs for c in p.as_conversations()]
        s = rm.score_conversations(convs)
        rows = [{"chosen": s[2 * i], "rejected": s[2 * i + 1]} for i in range(len(prefs))]
        acc = sum(r["chosen"] > r["rejected"] for r in rows) / len(rows)
        return {"rows": rows, "accuracy": acc, "mean": sum(s) / len(s)}
    convs = [r for r in recs if isinstance(r, Conversation)]
    s = rm.score_conversations(convs)
    return {"rows": [{"score": x} for x in s], "mean": sum(s) / max(len(s), 1),
            "std": math.sqrt(sum((x - sum(s) / len(s)) ** 2 for x in s) / max(len(s), 1)) if s else 0.0}
