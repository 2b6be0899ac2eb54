"""Reaching inside a training model's wrappers (accelerate/DDP, PEFT) for the pieces methods compute with."""

from __future__ import annotations

from typing import Any


def unwrap(model: Any) -> Any:
    """The model under an accelerate/DDP wrapper, if any."""
    return getattr(model, "module", model)


def backbone(model: Any) -> Any:
    """The transformer body (no LM head); LoRA layers live inside it, so adapters apply."""
    m = unwrap(model)
    if hasattr(m, "get_base_model"):
        m = m.get_base_model()
    return m.base_model
