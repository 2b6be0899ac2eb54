"""Server tests reuse the tiny LoRA fixtures of tests/engine (tiny Llama folder + two random adapters)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "engine"))

from lora_fixtures import make_adapter, make_tiny_model_dir  # noqa: E402


@pytest.fixture(scope="session")
def lora_base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture(scope="session")
def tiny_adapters(lora_base_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("adapters")
    make_adapter(lora_base_dir, root / "alpha", seed=1)
    make_adapter(lora_base_dir, root / "beta" / "adapter", seed=2)
    return root
