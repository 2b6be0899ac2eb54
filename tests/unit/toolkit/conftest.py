"""Fixtures for the data toolkit tests (helpers live in toolkit_helpers.py)."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _quiet_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
