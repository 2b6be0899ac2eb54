"""Supervised fine-tuning: next-token cross-entropy on the trained (by default assistant) tokens.

Batches are packed padding-free by default (see tunelab.data.packing); the LM head runs only on positions
whose next token is trained (`logits_to_keep`), which skips most of the vocabulary projection on prompts.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.data.packing import pack_rows, pad
from tunelab.data.records import Conversation
from tunelab.data.templates import Encoded, encode
from tunelab.losses import sft_loss
from tunelab.train.loop import Method


def forward_kept_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (N, V) at the kept positions of a packed or padded batch, in `targets` order."""
    if "position_ids" in batch:  # packed: per-example positions, no attention mask
        out = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], logits_to_keep=batch["keep"],
                    use_cache=False)
        if "sel" in batch:  # several rows: the kept columns are a union; pick each row's own targets
            return out.logits.reshape(-1, out.logits.shape[-1])[batch["sel"]]
        return out.logits[0]
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    return out.logits.reshape(-1, out.logits.shape[-1])[batch["keep_flat"]]


class SFT(Method):
    name = "sft"
    expect = "conversation"

    def encode(self, record: Any) -> Encoded | None:
        assert isinstance(record, Conversation)
        d = self.cfg.data
        enc = self.pre_encoded.get(id(record)) or encode(self.tokenizer, record, train_on=d.train_on,
                                                          max_len=d.max_seq_len, system_prompt=d.system_prompt)
        return enc if enc.num_trained > 0 else None

    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]:
        pad_id = int(self.tokenizer.pad_token_id)
        return pack_rows(items, pad_id) if self.cfg.data.packing else pad(items, pad_id)

    def count(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["targets"].numel())

    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> tuple[torch.Tensor, dict[str, float]]:
        logits = forward_kept_logits(model, batch)
        loss, m = sft_loss(logits, batch["targets"], num_items)
        return loss, {"loss_sum": m["loss_sum"], "items": m["tokens"], "correct": m["correct"]}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        return {"loss": sums.get("loss_sum", 0.0) / n, "token_acc": sums.get("correct", 0.0) / n}
