"""KTO over the shared loop: unpaired completions, each labelled desirable or undesirable (Ethayarajh et al.
2024). Reads the `unpaired` format ({"prompt", "completion", "label"}).

KTO's reference point z0 is the policy/reference KL, estimated on *mismatched* (prompt, completion) pairs:
example i's prompt with example i+1's completion, a pairing fixed once in `setup` so that, with
`kto.precompute_ref: true`, the reference log-probs of both the real and the mismatched sequences are
computed once before training. The reference model is the same as DPO's (`tunelab.train.dpo.Reference`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.records import Conversation
from tunelab.data.templates import Encoded
from tunelab.preference_losses import kto_kl_estimate, kto_loss
from tunelab.train.dpo import Reference, batch_logps, encode_completion, pack_sequences, precompute_ref_logps
from tunelab.train.loop import LoopContext, Method
from tunelab.train.sft import no_lora_input_casts


@dataclass
class KTOItem:
    enc: Encoded
    conv: Conversation
    desirable: bool
    kl_enc: Encoded | None = None
    ref: float | None = None
    ref_kl: float | None = None

    @property
    def truncated(self) -> bool:
        return self.enc.truncated


class KTO(Method):
    name = "kto"
    expect = "conversation"

    def __init__(self, cfg: Any, tokenizer: Any) -> None:
        super().__init__(cfg, tokenizer)
        self.ref: Reference | None = None

    def encode(self, record: Any) -> KTOItem | None:
        assert isinstance(record, Conversation)
        if record.label is None:
            from tunelab.errors import TunelabError

            where = f"{record.source.file}:{record.source.line}: " if record.source else ""
            raise TunelabError(f"{where}KTO needs unpaired rows with a `label` (true = desirable, false = not)", 1)
        enc = encode_completion(self.tokenizer, record, self.cfg)
        return KTOItem(enc, record, bool(record.label)) if enc.num_trained else None

    def _pair_mismatched(self, items: list[KTOItem]) -> None:
        for i, it in enumerate(items):
            other = items[(i + 1) % len(items)].conv
            conv = Conversation(it.conv.prompt + other.messages[len(other.prompt):])
            it.kl_enc = encode_completion(self.tokenizer, conv, self.cfg)

    def setup(self, ctx: LoopContext) -> None:
        self._pair_mismatched(ctx.train_items)
        if ctx.valid_items:
            self._pair_mismatched(ctx.valid_items)
        if self.cfg.kto.precompute_ref:
            self.precompute(ctx)  # before step 1 the policy is the reference
        else:
            self.ref = Reference(ctx.model)

    def collate_no_ref(self, items: list[Any]) -> dict[str, torch.Tensor]:
        encs = [i.enc for i in items] + [i.kl_enc for i in items]
        batch = pack_sequences(encs, int(self.tokenizer.pad_token_id))
        batch["examples"] = torch.tensor(len(items))
        batch["desirable"] = torch.tensor([i.desirable for i in items])
        return batch

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        batch = self.collate_no_ref(items)
        if self.cfg.kto.precompute_ref:
            batch["ref_logps"] = torch.tensor([i.ref for i in items] + [i.ref_kl for i in items])
        return batch

    def precompute(self, ctx: LoopContext) -> None:
        def keep(it: Any, first: float, second: float) -> None:
            it.ref, it.ref_kl = first, second

        precompute_ref_logps(ctx, self.collate_no_ref, keep)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["examples"])

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> tuple[torch.Tensor, dict[str, float]]:
        n = int(batch["examples"])
        chunk = self.cfg.train.loss_chunk
        with no_lora_input_casts(model, self.cfg.finetune, batch["input_ids"].device):
            sums, _ = batch_logps(model, batch, chunk)  # real sequences first, then the mismatched (KL) ones
            if "ref_logps" in batch:
                ref = batch["ref_logps"].float().to(sums.device)
            else:
                assert self.ref is not None
                with torch.no_grad(), self.ref.context(model):
                    ref, _ = batch_logps(self.ref.model(model), batch, chunk)
        kl = kto_kl_estimate(sums[n:].detach(), ref[n:])
        k = self.cfg.kto
        loss, m = kto_loss(sums[:n], ref[:n], batch["desirable"], kl, beta=k.beta, desirable_weight=k.desirable_weight,
                           undesirable_weight=k.undesirable_weight, num_items=num_items)
        return loss, {"loss_sum": float(loss.detach()) * num_items, "items": float(n),
                      "acc_sum": m["rewards/accuracy"] * n, "kl_sum": m["kl"] * n}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        return {"loss": sums.get("loss_sum", 0.0) / n, "accuracy": sums.get("acc_sum", 0.0) / n,
                "kl": sums.get("kl_sum", 0.0) / n}
