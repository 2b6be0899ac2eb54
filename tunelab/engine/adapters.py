"""Finding adapter folders and checking that an adapter fits the served base model, without loading it.

An adapter folder is PEFT's format (`adapter_config.json` + `adapter_model.safetensors`). A directory of
adapters holds one per sub-folder, named after the sub-folder; a tunelab run folder keeps its adapter in
`RUN/adapter/` and is named after the run. The fit check reads only the safetensors header: every LoRA
matrix must match the in/out size of the base layer it patches. The base name an adapter records is only
a hint (paths move, hub ids and local copies differ), so a different name alone is not refused.
"""

from __future__ import annotations

import json
import logging
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.engine.types import AdapterError
from tunelab.model.names import builtin_for
from tunelab.rundir import RunDir

log = logging.getLogger(__name__)

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<kind>A|B|embedding_A|embedding_B)(?:\.[^.]+)?(?:\.weight)?$")


@dataclass(frozen=True)
class AdapterFolder:
    """What an adapter folder says about itself (read from disk; cheap)."""

    path: Path
    peft_type: str
    base_name: str | None
    use_dora: bool
    config: dict[str, Any]
    system_prompt: str | None = None
    """The run's `data.system_prompt` (a tunelab run folder's config.yaml): added to chat requests that bring no
    system message, as training, `tunelab eval` and `tunelab generate` add it, so serving renders the same prompt."""


def discover_adapters(root: Path) -> dict[str, Path]:
    """Adapters directly under `root`: `root/NAME/adapter_config.json` or `root/NAME/adapter/adapter_config.json`."""
    found: dict[str, Path] = {}
    try:
        subs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    except OSError:
        return found
    for sub in subs:
        if (sub / CONFIG).is_file():
            found[sub.name] = sub
        elif (run_adapter := RunDir(sub).adapter) is not None:
            found[sub.name] = run_adapter
    return found


def register_new_adapters(root: Path, is_known: Callable[[str], bool], register: Callable[[str, Path], Any],
                          rejected: dict[str, str]) -> None:
    """Register the adapters that appeared under `root` since the last look (either engine's `refresh`); one
    that cannot be served is remembered in `rejected` (path -> why) and not retried."""
    for name, path in discover_adapters(root).items():
        if is_known(name) or str(path) in rejected:
            continue
        try:
            register(name, path)
        except AdapterError as e:
            rejected[str(path)] = e.message
            log.warning("not serving %s: %s", path, e.message)


def read_adapter_folder(path: Path) -> AdapterFolder:
    """Read and sanity-check an adapter folder's config; raise AdapterError naming the file if it is unusable."""
    if not (path / CONFIG).is_file() and (run_adapter := RunDir(path).adapter) is not None:
        path = run_adapter  # a tunelab run folder
    cfg_path = path / CONFIG
    if not path.is_dir():
        raise AdapterError(f"{path}: adapter folder not found")
    if not cfg_path.is_file():
        raise AdapterError(f"{path}: no {CONFIG} (not a PEFT adapter folder)")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{cfg_path}: cannot read adapter config: {e}") from e
    if not isinstance(config, dict):
        raise AdapterError(f"{cfg_path}: expected a JSON object")
    peft_type = str(config.get("peft_type", ""))
    if peft_type.upper() != "LORA":
        raise AdapterError(f"{cfg_path}: peft_type is {peft_type or 'missing'!r}; only LoRA adapters can be served")
    if not (path / WEIGHTS).is_file() and not (path / "adapter_model.bin").is_file():
        raise AdapterError(f"{path}: no {WEIGHTS} (the adapter's weights are missing)")
    run = _run_config(path)
    base = config.get("base_model_name_or_path") or _section_str(run, "model", "name")
    return AdapterFolder(path, peft_type, str(base) if base else None, bool(config.get("use_dora")), config,
                         system_prompt=_section_str(run, "data", "system_prompt"))


def _run_config(path: Path) -> dict[str, Any]:
    # A tunelab run (or a registry version) keeps its config.yaml in the folder above RUN/adapter.
    import yaml

    try:
        data = yaml.safe_load(RunDir(path.parent).config_path.read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _section_str(cfg: dict[str, Any], section: str, key: str) -> str | None:
    sub = cfg.get(section)
    value = sub.get(key) if isinstance(sub, dict) else None
    return value if isinstance(value, str) and value else None


def with_run_system_prompt(messages: list[dict[str, Any]], system_prompt: str | None) -> list[dict[str, Any]]:
    """The request's messages with the run's system prompt first, unless they bring their own (the rule of
    `tunelab.data.templates.with_system_prompt`, on the wire's dicts)."""
    if not system_prompt or any(m.get("role") in ("system", "developer") for m in messages):
        return messages
    return [{"role": "system", "content": system_prompt}, *messages]


def safetensors_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Tensor shapes from a safetensors header (8-byte length + JSON), without reading the tensors."""
    try:
        with path.open("rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > 100_000_000:
                raise ValueError("header length is implausible")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise AdapterError(f"{path}: not a readable safetensors file ({e})") from e
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def check_fits(
    folder: AdapterFolder, name: str, layer_shapes: dict[str, tuple[int, int]], base_names: set[str], base_label: str
) -> None:
    """Raise AdapterError if the adapter's LoRA matrices do not fit the base model's layers.

    `layer_shapes` maps a base module name (e.g. model.layers.0.self_attn.q_proj) to (in, out) features.
    """
    weights = folder.path / WEIGHTS
    if not weights.is_file():
        return  # a legacy .bin adapter: PEFT checks it when loading
    shapes = safetensors_shapes(weights)
    trained_on = f" (it records base model {folder.base_name!r})" if folder.base_name else ""
    lora_keys = 0
    for key, shape in shapes.items():
        m = _LORA_KEY.match(key)
        if not m:
            continue
        lora_keys += 1
        module, kind = m.group("module"), m.group("kind")
        if module not in layer_shapes:
            raise AdapterError(
                f"adapter {name!r} ({folder.path}) does not fit base model {base_label!r}{trained_on}: "
                f"it patches layer {module!r}, which the base model does not have"
            )
        fan_in, fan_out = layer_shapes[module]
        if len(shape) != 2:
            continue
        got, want, what = (shape[1], fan_in, "in") if kind in ("A", "embedding_A") else (shape[0], fan_out, "out")
        if got != want:
            raise AdapterError(
                f"adapter {name!r} ({folder.path}) does not fit base model {base_label!r}{trained_on}: "
                f"layer {module!r} has {what}-size {want} in the base but {got} in the adapter"
            )
    if lora_keys == 0:
        raise AdapterError(f"adapter {name!r}: {weights} holds no LoRA weights")
    if folder.base_name and folder.base_name not in base_names and builtin_for(folder.base_name) not in base_names:
        # Same shapes, different recorded name: usually a moved path or a local copy of the same model.
        log.info("adapter %r records base %r; serving it on %r since its shapes fit", name, folder.base_name, base_label)
