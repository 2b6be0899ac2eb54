"""Which config keys are paths, and what a relative one is relative to.

- Files a run reads (`data.train`, `data.validation`, `data.test`, `data.mix.path`, the `data.pipeline` files,
  `eval.json_schema`, `eval.general_data`, and `model.name` when it names a local folder or file) are relative
  to the folder of the config file that sets them, so a config works from any directory and next to its data.
- A value given with `--set` is relative to the current directory, like any path typed on a command line.
- Run folders (`output_dir`, `ppo.reward_model`, `grpo.reward_model`) stay relative to the current directory:
  runs are written where you work, never into the folder of a shipped example config.

Resolved paths are absolute, so the `config.yaml` a run writes into its folder loads back from anywhere.
`check_inputs` then turns a missing data file into an error naming the config key.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

# Dotted keys; "*" walks every item of a list.
INPUT_FILES = ("data.train", "data.validation", "data.test", "data.mix.path")
FOLDER_RELATIVE = (
    *INPUT_FILES,
    "data.pipeline.input",
    "data.pipeline.output",
    "data.pipeline.work_dir",
    "data.pipeline.steps.*.contamination.eval",
    "eval.json_schema",
    "eval.general_data",
)
MODEL_NAME = "model.name"


def _absolute(value: str, base: Path) -> str:
    p = Path(value).expanduser()
    # abspath, not resolve(): keep the user's symlinked folders as they wrote them.
    return p.as_posix() if p.is_absolute() else os.path.abspath(base / p)


def _local_model(value: str, base: Path) -> str:
    """A model name is a hub id, a built-in name or a local path: only a path that exists (or is written as one)
    is made absolute; `HuggingFaceTB/SmolLM2-135M` stays a hub id unless such a folder sits next to the config."""
    looks_local = value.startswith(("./", "../", "~")) or value.endswith(".gguf")
    candidate = Path(value).expanduser()
    if candidate.is_absolute():
        return value
    if looks_local or (base / candidate).exists():
        return os.path.abspath(base / candidate)
    return value


def walk(node: Any, parts: list[str], fn: Any) -> None:
    """Apply fn to the string at `parts` inside nested dicts/lists (missing keys and non-strings are left for
    the validator to report)."""
    if not parts:
        return
    head, rest = parts[0], parts[1:]
    if head == "*":
        if isinstance(node, list):
            for item in node:
                walk(item, rest, fn)
        return
    if not isinstance(node, dict) or head not in node:
        return
    if rest:
        walk(node[head], rest, fn)
    elif isinstance(node[head], str) and node[head]:
        node[head] = fn(node[head])


def _selected(key: str, only: Iterable[str] | None) -> bool:
    if only is None:
        return True
    plain = key.split(".*")[0]
    # `--set data.train=x` selects data.train; `--set data={train: x}` selects everything under data.
    return any(plain == o or plain.startswith(o + ".") for o in only)


def resolve_paths(raw: dict[str, Any], base: Path, only: Iterable[str] | None = None) -> dict[str, Any]:
    """Make the folder-relative paths in a raw config mapping absolute against `base`, in place.
    `only`: dotted keys (from --set) whose values alone are resolved."""
    keys = list(only) if only is not None else None
    for key in FOLDER_RELATIVE:
        if _selected(key, keys):
            walk(raw, key.split("."), lambda v: _absolute(v, base))
    if _selected(MODEL_NAME, keys):
        walk(raw, MODEL_NAME.split("."), lambda v: _local_model(v, base))
    return raw


def check_inputs(cfg: Any, source: str, overridden: Iterable[str] = ()) -> None:
    """Every data file the run reads exists; a missing one is an error naming its key and where it was looked
    for. The output of the config's own `data.pipeline` may be missing: `tunelab data pipeline` writes it."""
    produced = cfg.data.pipeline.output if cfg.data.pipeline is not None else None
    values = {"data.train": cfg.data.train, "data.validation": cfg.data.validation, "data.test": cfg.data.test,
              "data.mix.path": cfg.data.mix.path if cfg.data.mix is not None else None}
    set_keys = list(overridden)
    for key, value in values.items():
        if not value or value == produced or Path(value).is_file():
            continue
        if _selected(key, set_keys):
            why = "--set paths are relative to the current directory"
        else:
            why = f"paths in a config file are relative to its folder, {Path(source).resolve().parent}"
        what = "is a folder, not a file" if Path(value).is_dir() else "file not found"
        raise ConfigError(f"{source}: {key}: {what}: {value} ({why})")
