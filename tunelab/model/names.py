"""What a base model is called outside tunelab: the hub id of a built-in model, the absolute path of a local one.

Adapters record this as `base_model_name_or_path`, so PEFT's `AutoPeftModelForCausalLM`, vLLM and other tools can
find their base; tunelab maps a built-in's hub id back to the built-in when loading (`builtin_for`), so its own
loading stays offline. Torch-free: the engine's adapter checks and the registry use it too.
"""

from __future__ import annotations

from pathlib import Path

# built-in name -> the hub repository it is a (quantized, shipped offline) copy of
BUILTIN_HUB_IDS: dict[str, str] = {"smollm2-135m-instruct": "HuggingFaceTB/SmolLM2-135M-Instruct"}


def portable_name(name: str) -> str:
    """The name other tools resolve: a built-in's hub id, an existing local folder or file as an absolute path,
    anything else (a hub id) as is."""
    if name in BUILTIN_HUB_IDS:
        return BUILTIN_HUB_IDS[name]
    p = Path(name).expanduser()
    return str(p.resolve()) if p.exists() else name


def builtin_for(name: str) -> str | None:
    """The built-in model a hub id names (hub ids are case-insensitive), or None."""
    low = name.lower()
    return next((b for b, hub in BUILTIN_HUB_IDS.items() if hub.lower() == low), None)
