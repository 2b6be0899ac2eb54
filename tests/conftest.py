"""Shared fixtures: tiny models and tokenizers built in-process (see tests/tiny.py)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# `tunelab serve` keeps its jobs data under $XDG_DATA_HOME/tunelab: never the real home in tests (servers started
# by session fixtures and subprocesses inherit this, so it is set before any fixture runs).
os.environ["XDG_DATA_HOME"] = tempfile.mkdtemp(prefix="tunelab-test-xdg-")

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tok() -> Any:
    return tiny.tiny_tokenizer()


@pytest.fixture
def model() -> Any:
    return tiny.tiny_model()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model saved as a Hugging Face folder, usable as `model.name` in configs."""
    return tiny.save_tiny(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    # Keep the real SmolLM2 cache shared (conversion takes ~30 s) unless a test overrides it.
    if "TUNELAB_CACHE" not in os.environ:
        monkeypatch.setenv("TUNELAB_CACHE", str(Path.home() / ".cache" / "tunelab"))
