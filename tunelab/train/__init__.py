"""Training: the loop (loop.py), one file per method, checkpoints, tracking; `run.py` sets a run up.

This package is also the public `tunelab.train(config)`: a package and a function cannot share the name
`tunelab.train`, so the package is callable and calling it is `tunelab._api.train` (docs/python.md).
Importing it stays cheap: no torch until a submodule or the call needs it.
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tunelab.config import RunConfig
    from tunelab.rundir import RunDir


class _CallablePackage(types.ModuleType):
    def __call__(self, config: RunConfig | str | Path, **kwargs: Any) -> RunDir:
        from tunelab._api import train

        return train(config, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
