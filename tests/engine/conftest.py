"""Tiny in-process Llama + byte-level tokenizer + random LoRA adapters, shared by engine and server tests."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lora_fixtures import make_adapter, make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def lora_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapters(lora_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory with adapters `alpha` (plain folder) and `beta` (a run folder: beta/adapter/)."""
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(lora_base_dir, root / "alpha", seed=1)
    make_adapter(lora_base_dir, root / "beta" / "adapter", seed=2)
    return root
