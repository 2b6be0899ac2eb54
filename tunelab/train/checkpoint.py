"""Checkpoints: written atomically (temporary folder, then rename), so a run killed at any moment -- even
with `kill -9` mid-write -- leaves only complete checkpoints behind. Each holds the trainable weights
(PEFT adapter or full model), optimizer, scheduler, RNG states, loop state (data position) and the config.

Nothing in a checkpoint is a pickle: weights are safetensors, and the optimizer, scheduler and RNG states are
each a JSON tree whose tensors sit in a safetensors file beside it (`save_tree` / `load_tree`). Loading a
checkpoint therefore never runs code from the file, whoever wrote the folder. Checkpoints of older versions
(`*.pt`) are read with `torch.load(weights_only=True)`, which refuses anything but tensors and plain data.
"""

from __future__ import annotations

import json
import random
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tunelab.rundir import RunDir, checkpoint_name

EXTRA_FILE = "method_state.safetensors"  # a method's own trainable tensors (reward/value heads)


def save_weights(model: Any, out: Path, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT models save adapter_config.json + adapter_model.safetensors; full models a whole HF folder.
    `state_dict`: weights gathered from a sharded model (train/fsdp.py) instead of the model's own."""
    out.mkdir(parents=True, exist_ok=True)
    if hasattr(model, "peft_config"):
        # "auto" would look the base's config up on the hub to see whether the vocabulary changed: never
        # reach the network while saving (tunelab does not resize embeddings).
        model.save_pretrained(out, safe_serialization=True, save_embedding_layers=False, state_dict=state_dict)
    else:
        model.save_pretrained(out, safe_serialization=True, state_dict=state_dict)


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    run_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any, loop_state: dict[str, Any],
    config_yaml: str, weights_name: str, keep: int, extra: dict[str, torch.Tensor] | None = None,
    on_commit: Callable[[Path], None] | None = None, state_dict: dict[str, torch.Tensor] | None = None,
    optimizer_state: dict[str, Any] | None = None,
) -> Path:
    """Write `step-NNNNNN` atomically, call `on_commit(path)` (e.g. export the weights elsewhere) while it
    still exists, then rotate older checkpoints away."""
    ckpts = RunDir(run_dir).checkpoints_dir
    ckpts.mkdir(parents=True, exist_ok=True)
    final = ckpts / checkpoint_name(step)
    tmp = ckpts / f".tmp-{checkpoint_name(step)}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    save_weights(model, tmp / weights_name, state_dict=state_dict)
    # A sharded run passes its gathered state: keyed by parameter name, loadable on any number of processes.
    save_tree(optimizer_state if optimizer_state is not None else optimizer.state_dict(), tmp / "optimizer")
    save_tree(scheduler.state_dict(), tmp / "scheduler")
    save_tree(rng_state(), tmp / "rng")
    (tmp / "state.json").write_text(json.dumps(loop_state, indent=1))
    (tmp / "config.yaml").write_text(config_yaml)
    if extra:
        from safetensors.torch import save_file

        save_file({k: v.detach().cpu().contiguous() for k, v in extra.items()}, str(tmp / EXTRA_FILE))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)  # the commit point
    if on_commit is not None:
        on_commit(final)  # before rotation, so a caller that keeps every checkpoint never races it
    rotate(ckpts, keep, protect=loop_state.get("best_step"))
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    return [c.path for c in RunDir(run_dir).checkpoints()]


def rotate(ckpts: Path, keep: int, protect: int | None = None) -> None:
    for leftover in ckpts.glob(".tmp-step-*"):  # from a run killed mid-write
        shutil.rmtree(leftover, ignore_errors=True)
    done = list_checkpoints(ckpts.parent)
    for p in done[:-keep]:
        if protect is not None and p.name == checkpoint_name(protect):
            continue
        shutil.rmtree(p, ignore_errors=True)


def load_checkpoint(path: Path) -> tuple[dict[str, Any], Any, Any, dict[str, Any]]:
    """(loop_state, optimizer_state, scheduler_state, rng_state)."""
    state = json.loads((path / "state.json").read_text())
    return state, _load_part(path, "optimizer"), _load_part(path, "scheduler"), _load_part(path, "rng")


# ------------------------------------------------------------------ pickle-free state files
def save_tree(obj: Any, stem: Path) -> None:
    """Write a nest of dicts, lists, tuples, numbers, strings, tensors and numpy arrays as `stem.json`
    (the structure) + `stem.safetensors` (the tensors, referenced by key from the JSON)."""
    from safetensors.torch import save_file

    tensors: dict[str, torch.Tensor] = {}
    tree = _encode(obj, tensors, set())
    save_file(tensors, str(stem.with_suffix(".safetensors")))
    stem.with_suffix(".json").write_text(json.dumps(tree))


def load_tree(stem: Path) -> Any:
    from safetensors.torch import load_file

    tensors = load_file(str(stem.with_suffix(".safetensors")))
    return _decode(json.loads(stem.with_suffix(".json").read_text()), tensors)


def _encode(obj: Any, tensors: dict[str, torch.Tensor], storages: set[int]) -> Any:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # safetensors refuses tensors that share memory
        if t.numel():
            storages.add(t.untyped_storage().data_ptr())
        key = f"t{len(tensors)}"
        tensors[key] = t
        return {"__tensor__": key}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, tuple):
        return {"__tuple__": [_encode(v, tensors, storages) for v in obj]}
    if isinstance(obj, list):
        return [_encode(v, tensors, storages) for v in obj]
    if isinstance(obj, dict):
        # Keys keep their type (optimizer state is keyed by parameter index): stored as pairs.
        return {"__dict__": [[_encode(k, tensors, storages), _encode(v, tensors, storages)] for k, v in obj.items()]}
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (tensors and plain data only)")


def _decode(tree: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(tree, list):
        return [_decode(v, tensors) for v in tree]
    if not isinstance(tree, dict):
        return tree
    if "__tensor__" in tree:
        return tensors[tree["__tensor__"]]
    if "__ndarray__" in tree:
        return np.array(tree["__ndarray__"], dtype=np.dtype(tree["dtype"]))
    if "__tuple__" in tree:
        return tuple(_decode(v, tensors) for v in tree["__tuple__"])
    return {_decode(k, tensors): _decode(v, tensors) for k, v in tree["__dict__"]}


def _load_part(path: Path, name: str) -> Any:
    if (path / f"{name}.json").exists():
        return load_tree(path / name)
    old = path / f"{name}.pt"  # a checkpoint from before the pickle-free format
    # weights_only: tensors and plain data only, never arbitrary objects; numpy's RNG state array is allowed.
    from numpy._core.multiarray import _reconstruct  # type: ignore[attr-defined]

    with torch.serialization.safe_globals([_reconstruct, np.ndarray, np.dtype, type(np.dtype(np.uint32))]):
        return torch.load(old, weights_only=True)


def load_extra(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    p = path / EXTRA_FILE
    return load_file(str(p)) if p.exists() else {}


def read_full_weights(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a full-model folder (save_pretrained may split it over several files)."""
    from safetensors.torch import load_file

    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def load_weights_into(model: Any, path: Path) -> None:
    """Load trainable weights saved by save_weights back into a live (possibly PEFT-wrapped) model."""
    from safetensors.torch import load_file

    if (path / "adapter_model.safetensors").exists():
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, load_file(str(path / "adapter_model.safetensors")))
        return
    missing, unexpected = model.load_state_dict(read_full_weights(path), strict=False)
    missing = [k for k in missing if "lm_head" not in k]
    if missing or unexpected:
        raise RuntimeError(f"checkpoint {path} does not match the model: missing {missing[:3]} unexpected {unexpected[:3]}")
