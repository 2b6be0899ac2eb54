"""Reaching inside a training model's wrappers (accelerate/DDP, PEFT) for the pieces methods compute with."""

from __future__ import annotations

from typing import Any


def unwrap(model: Any) -> Any:
    """The model under an accelerate/DDP wrapper, if any."""
    return getattr(model, "module", model)


def base_model(model: Any) -> Any:
    """The transformers model under accelerate/DDP and PEFT wrappers (its config, its modules)."""
    m = unwrap(model)
    return m.get_base_model() if callable(getattr(m, "get_base_model", None)) else m


def backbone(model: Any) -> Any:
    """The transformer body (no LM head); LoRA layers live inside it, so adapters apply."""
    return base_model(model).base_model
