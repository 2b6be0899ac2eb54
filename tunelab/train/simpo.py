"""SimPO over the shared loop: the reward of a completion is beta times its mean token log-prob, and the
chosen one must beat the rejected one by a margin gamma (Meng et al. 2024). No reference model at all.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.preference_losses import simpo_loss
from tunelab.train.dpo import PairMethod


class SimPO(PairMethod):
    name = "simpo"

    def pair_loss(
        self, model: Any, batch: dict[str, torch.Tensor], sums: torch.Tensor, counts: torch.Tensor, num_items: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        b, s = int(batch["pairs"]), self.cfg.simpo
        return simpo_loss(sums[:b], sums[b:], counts[:b], counts[b:], beta=s.beta, gamma=s.gamma,
                          label_smoothing=s.label_smoothing, num_items=num_items)
