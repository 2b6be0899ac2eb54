"""Losses as pure functions of tensors: each returns `(loss, metrics)` and knows nothing about models,
data loading or optimizers. Hand-checked in tests/unit/test_losses*.py.

Token losses are *sums* divided by a caller-given normaliser (`num_items`), not per-batch means: the loop
passes the number of trained tokens in the whole optimizer step (all micro-batches, all processes), which
makes gradient accumulation and data parallelism exactly equivalent to one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over already-aligned (logits[i] predicts targets[i]) trained positions.

    logits: (N, V) for the N kept positions; targets: (N,) with IGNORE_INDEX for positions not trained.
    Returns (sum of token losses / num_items, metrics with the unnormalised sums so callers can aggregate).
    """
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = targets != IGNORE_INDEX
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets) & mask).sum().item()
    n = int(mask.sum().item())
    return loss_sum / num_items, {"loss_sum": float(loss_sum.item()), "tokens": n, "correct": float(correct)}


def sequence_logps(
    logits: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the trained targets per segment (sequence), and the token count per segment.

    logits (N, V), targets (N,) with IGNORE_INDEX, segment_ids (N,) in [0, num_segments). Used by every
    preference method (DPO, ORPO, SimPO, KTO) on packed rows.
    """
    mask = targets != IGNORE_INDEX
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    logp = logp * mask
    sums = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device).index_add(0, segment_ids, logp)
    counts = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device).index_add(0, segment_ids, mask.to(logp.dtype))
    return sums, counts
