"""A run folder (minimal placeholder: `RunDir(path)` and `.path`; the full class owning the folder's layout
replaces this file)."""

from __future__ import annotations

from pathlib import Path


class RunDir:
    """A tunelab run folder."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"
