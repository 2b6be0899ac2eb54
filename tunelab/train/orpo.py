"""ORPO over the shared loop: SFT on the chosen completion plus an odds-ratio preference term, one model, no
reference (Hong et al. 2024). The SFT part is each pair's mean token NLL of the chosen completion, so it is
normalised per pair like the preference term and gradient accumulation stays exact.
"""

from __future__ import annotations

from typing import Any

import torch

from tunelab.preference_losses import orpo_loss
from tunelab.train.dpo import PairMethod


class ORPO(PairMethod):
    name = "orpo"

    def pair_loss(
        self, model: Any, batch: dict[str, torch.Tensor], sums: torch.Tensor, counts: torch.Tensor, num_items: float
    ) -> tuple[torch.Tensor, dict[str, float]]:
        b = int(batch["pairs"])
        nll = (-sums[:b] / counts[:b].clamp(min=1)).sum() / num_items
        return orpo_loss(sums[:b], sums[b:], counts[:b], counts[b:], nll, beta=self.cfg.orpo.beta, num_items=num_items)
