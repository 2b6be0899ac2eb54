"""Supervised fine-tuning: next-token cross-entropy on the trained (by default assistant) tokens.

Batches are packed padding-free by default (see tunelab.data.packing); the LM head runs only on positions
whose next token is trained. By default it runs there in chunks fused with the loss
(`tunelab.losses.linear_cross_entropy`, `train.loss_chunk`), so the (tokens x vocabulary) logits never exist
whole; models whose head is more than a plain linear layer (soft-capped or scaled logits, an adapted or
sharded head) get the reference path, `forward_kept_logits` + `sft_loss`.
"""

from __future__ import annotations

import weakref
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.packing import pack_rows, pad
from tunelab.data.records import Conversation
from tunelab.data.templates import Encoded, encode
from tunelab.losses import linear_cross_entropy, sft_loss
from tunelab.model.parts import base_model, unwrap
from tunelab.train.fastpath import PACKED, SEQ_LENS_KWARG, segment_lengths
from tunelab.train.loop import Method


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    if "position_ids" in batch:  # packed: per-example positions, no attention mask
        return {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"]}
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def _forward_inputs(model: Any, batch: dict[str, torch.Tensor]) -> dict[str, Any]:
    """`_model_inputs`, plus the packed rows' segment lengths for a model on packed attention (fastpath)."""
    inputs: dict[str, Any] = _model_inputs(batch)
    config = getattr(base_model(model), "config", None)
    if "position_ids" in batch and getattr(config, "_attn_implementation", None) == PACKED:
        inputs[SEQ_LENS_KWARG] = segment_lengths(batch["position_ids"])
    return inputs


def kept(x: torch.Tensor, batch: dict[str, torch.Tensor], cols_taken: bool) -> torch.Tensor:
    """Rows (N, ...) of a per-position tensor (B, L, ...) at the kept positions, in `targets` order.
    `cols_taken`: x already holds only the kept columns of a packed batch (logits_to_keep)."""
    if "position_ids" not in batch:
        return x.reshape(-1, *x.shape[2:])[batch["keep_flat"]]
    if not cols_taken:
        x = x[:, batch["keep"]]
    if "sel" in batch:  # several rows: the kept columns are a union; pick each row's own targets
        return x.reshape(-1, *x.shape[2:])[batch["sel"]]
    return x[0]


def forward_kept_logits(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits (N, V) at the kept positions of a packed or padded batch, in `targets` order."""
    if "position_ids" in batch:
        out = model(**_forward_inputs(model, batch), logits_to_keep=batch["keep"], use_cache=False)
        return kept(out.logits, batch, cols_taken=True)
    out = model(**_model_inputs(batch), use_cache=False)
    return kept(out.logits, batch, cols_taken=False)


def forward_kept_hidden(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (N, H) at the kept positions (the LM head's inputs), in `targets` order; the head
    itself runs on no position. Through the whole (wrapped) model, not `backbone(model)`: DDP's forward is what
    prepares its gradient all-reduce."""
    none = torch.zeros(0, dtype=torch.long, device=batch["input_ids"].device)
    out = model(**_forward_inputs(model, batch), logits_to_keep=none, output_hidden_states=True, use_cache=False)
    return kept(out.hidden_states[-1], batch, cols_taken=False)


def plain_lm_head(model: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """The LM head's weight when logits are exactly `final_hidden @ weight.T`, else None.

    Checked, not assumed: a plain bias-free nn.Linear with an ordinary tensor weight (not a sharded DTensor),
    and the model's own logits on the batch's first few tokens equal that product (soft-capping or scaling
    models such as Gemma 2 or Granite fail it)."""
    from torch.distributed.tensor import DTensor

    inner = unwrap(model)
    head = inner.get_output_embeddings()
    if type(head) is not torch.nn.Linear or head.bias is not None or isinstance(head.weight, DTensor):
        return None
    probe = {k: v[:1, :8] for k, v in _model_inputs(batch).items()}
    was_training = inner.training
    inner.eval()  # no dropout: the probe draws no random numbers, so runs and resumes stay reproducible
    try:
        with torch.no_grad():
            out = inner(**probe, output_hidden_states=True, use_cache=False)
            mine = F.linear(out.hidden_states[-1], head.weight).float()
            ref = out.logits.float()
    finally:
        inner.train(was_training)
    ok = ref.shape == mine.shape and torch.allclose(mine, ref, rtol=1e-2, atol=1e-2 * float(ref.abs().max()) + 1e-6)
    return head.weight if ok else None


_PLAIN_HEAD: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()


def fused_head_weight(model: Any, batch: dict[str, torch.Tensor], chunk: int) -> torch.Tensor | None:
    """The LM head's weight when the chunked head + loss path applies: `chunk` > 0 and `plain_lm_head` holds
    (probed on the first batch a model sees, then remembered for that model); else None."""
    if not chunk:
        return None
    inner = unwrap(model)
    if inner not in _PLAIN_HEAD:
        _PLAIN_HEAD[inner] = plain_lm_head(model, batch) is not None
    return inner.get_output_embeddings().weight if _PLAIN_HEAD[inner] else None


def no_lora_input_casts(model: Any, finetune: str, device: torch.device) -> Any:
    """Under autocast, PEFT's cast of each LoRA layer's input to the fp32 adapter dtype is undone at once by
    autocast (the adapter matmuls run in bf16): two copies of every LoRA input for the same result. Skip it."""
    if finetune != "lora" or not torch.is_autocast_enabled(device.type):
        return nullcontext()
    from peft.helpers import disable_input_dtype_casting

    return disable_input_dtype_casting(unwrap(model))


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
        with no_lora_input_casts(model, self.cfg.finetune, batch["input_ids"].device):
            return self._loss(model, batch, num_items)

    def _loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> tuple[torch.Tensor, dict[str, float]]:
        chunk = self.cfg.train.loss_chunk
        weight = fused_head_weight(model, batch, chunk)
        if weight is not None:
            loss, m = linear_cross_entropy(forward_kept_hidden(model, batch), weight, batch["targets"], num_items, chunk,
                                           compiled=self.cfg.train.compile)
        else:
            loss, m = sft_loss(forward_kept_logits(model, batch), batch["targets"], num_items)
        return loss, {"loss_sum": m["loss_sum"], "items": m["tokens"], "correct": m["correct"]}

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        return {"loss": sums.get("loss_sum", 0.0) / n, "token_acc": sums.get("correct", 0.0) / n}
