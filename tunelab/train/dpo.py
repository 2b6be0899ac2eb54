"""DPO over the shared loop, plus the pieces every pairwise preference method reuses (ORPO and SimPO import
`PairMethod` from here; KTO and PPO import `Reference`).

A batch packs all chosen completions, then all rejected ones, padding-free into rows no longer than the
longest (`pack_rows`); one forward gives every scored token's log-prob (`linear_logps`, by chunks of the LM
head), summed per sequence. The reference model is never a second copy
when adapters are trained: it is the same model with the adapters switched off (`disable_adapter()`). Full
fine-tuning keeps one frozen copy. With `dpo.precompute_ref: true` the reference log-probs of every example
are computed once in `setup`, before the first step, and the reference never runs during training.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.packing import pack_rows
from tunelab.data.records import Conversation, Preference
from tunelab.data.templates import Encoded, encode
from tunelab.losses import linear_logps, segment_sums, token_logps
from tunelab.model.parts import unwrap
from tunelab.preference_losses import dpo_loss
from tunelab.train.loop import LoopContext, Method, autocast
from tunelab.train.sft import forward_kept_hidden, forward_kept_logits, fused_head_weight, no_lora_input_casts


def is_peft(model: Any) -> bool:
    return hasattr(unwrap(model), "disable_adapter") and hasattr(unwrap(model), "peft_config")


class Reference:
    """log pi_ref, without a second model when adapters are trained.

    adapters: the policy itself inside `disable_adapter()` (LoRA's B starts at zero, so this is exactly the
    starting model); full fine-tuning: a frozen deep copy taken before the first step."""

    def __init__(self, model: Any) -> None:
        self.copy: Any = None
        if not is_peft(model):
            self.copy = copy.deepcopy(unwrap(model)).eval()
            for p in self.copy.parameters():
                p.requires_grad_(False)

    def context(self, model: Any) -> AbstractContextManager[Any]:
        return unwrap(model).disable_adapter() if self.copy is None else nullcontext()

    def model(self, model: Any) -> Any:
        return model if self.copy is None else self.copy


@dataclass
class PairItem:
    chosen: Encoded
    rejected: Encoded
    ref_chosen: float | None = None
    ref_rejected: float | None = None

    @property
    def truncated(self) -> bool:
        return self.chosen.truncated or self.rejected.truncated


def encode_completion(tok: Any, conv: Conversation, cfg: Any) -> Encoded:
    """Only the final assistant turn is the completion whose log-prob is scored."""
    d = cfg.data
    return encode(tok, conv, train_on="last_assistant", max_len=d.max_seq_len, system_prompt=d.system_prompt)


def pack_sequences(encs: list[Encoded], pad_id: int) -> dict[str, torch.Tensor]:
    """`pack_rows` with `segment_ids` (which sequence each scored position belongs to): padding-free rows no
    longer than the longest sequence, so attention costs what a padded batch pays, not the square of the
    whole batch's length."""
    return pack_rows(encs, pad_id, segments=True)


def batch_logps(model: Any, batch: dict[str, torch.Tensor], chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(per-sequence summed log-probs, per-sequence token counts). With `chunk` (`train.loss_chunk`) and a
    plain LM head, the head runs `chunk` kept positions at a time (`linear_logps`): no (tokens x vocabulary)
    logits, and so none of their fp32 log-softmax either; else the reference, whole logits."""
    targets = batch["targets"]
    weight = fused_head_weight(model, batch, chunk)
    if weight is not None:
        logp = linear_logps(forward_kept_hidden(model, batch), weight, targets, chunk)
    else:
        logp = token_logps(forward_kept_logits(model, batch), targets)
    return segment_sums(logp, targets, batch["segment_ids"], int(batch["num_sequences"]))


class PairMethod(Method):
    """Shared by DPO, ORPO and SimPO: (prompt, chosen, rejected) in, summed completion log-probs out."""

    expect = "preference"
    needs_ref = False
    precompute_ref = False

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        self.ref: Reference | None = None
        self.pad_id = int(tokenizer.pad_token_id)  # load_tokenizer sets one (EOS when the model has none)

    def encode(self, record: Any) -> PairItem | None:
        assert isinstance(record, Preference)
        c, r = record.as_conversations()
        item = PairItem(encode_completion(self.tokenizer, c, self.cfg), encode_completion(self.tokenizer, r, self.cfg))
        return item if item.chosen.num_trained and item.rejected.num_trained else None

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        batch = pack_sequences([i.chosen for i in items] + [i.rejected for i in items], self.pad_id)
        batch["pairs"] = torch.tensor(len(items))
        if self.precompute_ref:
            batch["ref_logps"] = torch.tensor([i.ref_chosen for i in items] + [i.ref_rejected for i in items])
        return batch

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["pairs"])

    def setup(self, ctx: LoopContext) -> None:
        if not self.needs_ref:
            return
        if self.precompute_ref:
            # Before the first step the policy *is* the reference (adapters start as a no-op): no copy needed.
            self.precompute(ctx)
        else:
            self.ref = Reference(ctx.model)

    def precompute(self, ctx: LoopContext) -> None:
        def keep(it: Any, first: float, second: float) -> None:
            it.ref_chosen, it.ref_rejected = first, second

        precompute_ref_logps(ctx, self.collate_no_ref, keep)

    def collate_no_ref(self, items: list[Any]) -> dict[str, torch.Tensor]:
        batch = pack_sequences([i.chosen for i in items] + [i.rejected for i in items], self.pad_id)
        batch["pairs"] = torch.tensor(len(items))
        return batch

    def ref_logps(self, model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if "ref_logps" in batch:
            return batch["ref_logps"].float()
        assert self.ref is not None, "setup() builds the reference"
        with torch.no_grad(), self.ref.context(model):
            sums, _ = batch_logps(self.ref.model(model), batch, self.cfg.train.loss_chunk)
        return sums

    def pair_loss(
        self, model: Any, batch: dict[str, torch.Tensor], sums: torch.Tensor, counts: torch.Tensor, num_items: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> tuple[torch.Tensor, dict[str, float]]:
        with no_lora_input_casts(model, self.cfg.finetune, batch["input_ids"].device):
            sums, counts = batch_logps(model, batch, self.cfg.train.loss_chunk)
            loss, m = self.pair_loss(model, batch, sums, counts, num_items)
        n = float(batch["pairs"])
        return loss, {
            "loss_sum": float(loss.detach()) * num_items, "items": n,
            "acc_sum": m["rewards/accuracy"] * n, "margin_sum": m["rewards/margin"] * n,
            "chosen_sum": m["rewards/chosen"] * n, "rejected_sum": m["rewards/rejected"] * n,
        }

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        return {
            "loss": sums.get("loss_sum", 0.0) / n, "accuracy": sums.get("acc_sum", 0.0) / n,
            "margin": sums.get("margin_sum", 0.0) / n, "reward_chosen": sums.get("chosen_sum", 0.0) / n,
            "reward_rejected": sums.get("rejected_sum", 0.0) / n,
        }


class DPO(PairMethod):
    name = "dpo"
    needs_ref = True

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        self.precompute_ref = cfg.dpo.precompute_ref

    def pair_loss(
        self, model: Any, batch: dict[str, torch.Tensor], sums: torch.Tensor, counts: torch.Tensor, num_items: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        ref = self.ref_logps(model, batch).to(sums.device)
        b = int(batch["pairs"])
        d = self.cfg.dpo
        return dpo_loss(
            sums[:b], sums[b:], ref[:b], ref[b:], beta=d.beta, loss_type=d.loss_type, label_smoothing=d.label_smoothing,
            chosen_lengths=counts[:b], rejected_lengths=counts[b:], num_items=num_items,
        )


@torch.no_grad()
def preference_accuracy(model: Any, tokenizer: Any, cfg: Any, prefs: list[Preference], *, ref: Any = None,
                        batch_size: int = 8) -> float:
    """Held-out preference accuracy: the fraction of pairs where the chosen completion gets the higher implicit
    reward, log pi - log ref (sum over tokens; with `ref=None`, the per-token mean log-prob, SimPO's reward)."""
    m = PairMethod(cfg, tokenizer)
    items = [i for i in (m.encode(p) for p in prefs) if i is not None]
    model.eval()
    correct = 0
    dev = next(model.parameters()).device
    for j in range(0, len(items), batch_size):
        chunk = items[j : j + batch_size]
        batch = {k: v.to(dev) for k, v in m.collate_no_ref(chunk).items()}
        s, c = batch_logps(model, batch, cfg.train.loss_chunk)
        if ref is None:
            score = s / c.clamp(min=1)
        else:
            with ref.context(model):
                rs, _ = batch_logps(ref.model(model), batch, cfg.train.loss_chunk)
            score = s - rs
        b = len(chunk)
        correct += int((score[:b] > score[b:]).sum())
    return correct / max(len(items), 1)


@torch.no_grad()
def precompute_ref_logps(ctx: LoopContext, collate: Any, keep: Any) -> None:
    """Reference log-probs of every train/validation item, once: `collate` builds a batch whose first half of
    sequences pairs with its second half; `keep(item, first, second)` stores the two sums on the item."""
    was_training = ctx.model.training
    ctx.model.eval()
    bs = ctx.cfg.train.batch_size
    for items in (ctx.train_items, ctx.valid_items):
        for j in range(0, len(items), bs):
            chunk = items[j : j + bs]
            batch = {k: v.to(ctx.accelerator.device) for k, v in collate(chunk).items()}
            with autocast(ctx):  # the same precision the training forward will use
                sums, _ = batch_logps(ctx.model, batch, ctx.cfg.train.loss_chunk)
            for k, it in enumerate(chunk):
                keep(it, float(sums[k]), float(sums[len(chunk) + k]))
    ctx.model.train(was_training)
