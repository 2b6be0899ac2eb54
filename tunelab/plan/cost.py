"""`tunelab plan cost`: fine-tuning's one-off cost against what it saves on every call.

The guide's arithmetic: a fine-tuned model that no longer needs 500 tokens of format instructions, called ten
million times a month, saves five billion input tokens a month; add a switch from a hosted large model to a
self-hosted small one and the saving is per token too. Training is paid once (tokens x epochs at a measured
throughput and a GPU-hour price, or a hosted per-token training price), so there is a break-even month.
Prices are dollars per million tokens.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from tunelab.errors import TunelabError


@dataclass(frozen=True)
class CostInputs:
    calls_per_month: float
    prompt_tokens_removed: float = 0.0
    prompt_tokens: float = 0.0
    """Input tokens per call today (with the instructions the fine-tuned model no longer needs)."""
    output_tokens: float = 0.0
    input_price: float = 0.0
    """$ per 1M input tokens of the model used today."""
    output_price: float = 0.0
    new_input_price: float | None = None
    """$ per 1M input tokens after the switch (None: the same model, fine-tuned)."""
    new_output_price: float | None = None
    hosting_per_month: float = 0.0
    """Fixed monthly cost of serving the fine-tuned model yourself (GPU rent), if any."""
    train_tokens: float = 0.0
    epochs: float = 1.0
    tokens_per_s: float | None = None
    gpu_hour_price: float = 0.0
    gpus: int = 1
    train_price: float | None = None
    """$ per 1M training tokens (hosted fine-tuning), instead of throughput x GPU-hour price."""
    extra_cost: float = 0.0
    """One-off cost besides compute (data preparation, evaluation)."""

    def check(self) -> None:
        for name, v in asdict(self).items():
            if isinstance(v, (int, float)) and v < 0:
                raise TunelabError(f"--{name.replace('_', '-')} must not be negative", 2)
        if self.prompt_tokens and self.prompt_tokens_removed > self.prompt_tokens:
            raise TunelabError("--prompt-tokens-removed cannot exceed --prompt-tokens", 2)
        if self.train_tokens and self.train_price is None and not self.tokens_per_s:
            raise TunelabError("give --tokens-per-s (measured training throughput) with --gpu-hour-price, or "
                               "--train-price (per 1M training tokens)", 2)


def compute(c: CostInputs) -> dict[str, Any]:
    c.check()
    prompt = c.prompt_tokens or c.prompt_tokens_removed
    new_in = c.input_price if c.new_input_price is None else c.new_input_price
    new_out = c.output_price if c.new_output_price is None else c.new_output_price
    tokens_saved = c.prompt_tokens_removed * c.calls_per_month
    before = c.calls_per_month * (prompt * c.input_price + c.output_tokens * c.output_price) / 1e6
    after = c.calls_per_month * ((prompt - c.prompt_tokens_removed) * new_in + c.output_tokens * new_out) / 1e6 \
        + c.hosting_per_month
    trained = c.train_tokens * c.epochs
    if c.train_price is not None:
        gpu_hours = 0.0
        training = trained * c.train_price / 1e6
    else:
        gpu_hours = trained / c.tokens_per_s / 3600 * c.gpus if c.tokens_per_s else 0.0
        training = gpu_hours * c.gpu_hour_price
    one_off = training + c.extra_cost
    saving = before - after
    if saving > 0:
        months = one_off / saving
        break_even: int | None = max(1, math.ceil(months)) if one_off > 0 else 0
    else:
        months, break_even = math.inf, None
    return {
        "input_tokens_saved_per_month": tokens_saved,
        "monthly_cost_before": before,
        "monthly_cost_after": after,
        "monthly_saving": saving,
        "training_tokens": trained,
        "gpu_hours": gpu_hours,
        "training_cost": training,
        "one_off_cost": one_off,
        "break_even_months": None if math.isinf(months) else months,
        "break_even_month": break_even,
        "first_year_net": 12 * saving - one_off,
    }
