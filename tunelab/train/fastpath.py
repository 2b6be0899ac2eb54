"""Speed options of the training forward pass that change no result: `train.compile` compiles each decoder
layer with torch.compile (inductor; on CPU it needs a C++ compiler). Applied by `prepare_for_speed` to the
adapted model, before the optimizer is built. Measured in docs/benchmarks.md ("SFT-LoRA throughput").
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from tunelab.config import RunConfig

log = logging.getLogger(__name__)


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers decoder (under PEFT's wrappers): what torch.compile gets."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    for mod in base.modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def prepare_for_speed(model: Any, cfg: RunConfig) -> Any:
    if cfg.train.compile:
        layers = decoder_layers(model)
        # Shapes change with every packed batch: dynamic shapes from the start rather than a recompile per width.
        for layer in layers:
            layer.compile(dynamic=True)
        log.info("torch.compile: %d decoder layers", len(layers))
    return model
