"""tunelab: a self-hosted workbench for fine-tuning open LLMs (data, training, evaluation, serving).

The public Python API is what this module exports (docs/python.md); every other module is internal:

    load_config(path, overrides) -> RunConfig     a run config YAML, validated once
    train(config) -> RunDir                       fine-tune, as `tunelab train`
    evaluate(run_or_config, ...) -> dict          base vs fine-tuned on held-out data, as `tunelab eval`
    Generator.load(target).chat(messages)         generate from a base model or a run
    serve(model, adapters=...) -> ASGI app        the OpenAI-compatible server, for uvicorn
    Registry.open(data_dir)                       versions, aliases and A/B splits of named models

`import tunelab` is cheap: the names load on first use (PEP 562 `__getattr__`), so torch is imported only
when something needs it.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Generator", "Registry", "RunConfig", "RunDir", "evaluate", "load_config", "serve", "train"]

# name -> module that defines it. `train` is the callable `tunelab.train` package itself (see its docstring):
# a function of that name here would be replaced by the package as soon as `tunelab.train.run` is imported.
_EXPORTS = {
    "load_config": "tunelab.config",
    "RunConfig": "tunelab.config",
    "RunDir": "tunelab.rundir",
    "evaluate": "tunelab._api",
    "serve": "tunelab._api",
    "Generator": "tunelab.generate",
    "Registry": "tunelab.registry",
}

if TYPE_CHECKING:
    from tunelab._api import evaluate, serve, train
    from tunelab.config import RunConfig, load_config
    from tunelab.generate import Generator
    from tunelab.registry import Registry
    from tunelab.rundir import RunDir


def __getattr__(name: str) -> Any:
    if name == "train":
        return importlib.import_module("tunelab.train")
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tunelab' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later look-ups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*__all__, "__version__"})
