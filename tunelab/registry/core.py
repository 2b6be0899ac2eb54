"""The model registry: versions of a named model with lineage, aliases (production, staging, ...) and weighted
A/B splits, over a storage backend (SQL by default, MLflow's Model Registry as an option).

A version's weights are copied (hard-linked where the filesystem allows) into `DATA_DIR/registry/OWNER/NAME/vN/`,
so deleting or re-training the run never changes what a version serves. Everything a version serves lives in
its folder: `adapter/` or `model/`, `tokenizer/`, `config.yaml`, `manifest.json`, `eval/results.json`.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Protocol

import yaml

from tunelab.registry.types import (
    DEFAULT_ALIAS,
    Alias,
    Ref,
    RegistryError,
    Version,
    check_alias,
    check_name,
    parse_ref,
)

# What of a run folder a version keeps: the weights folder is added by kind.
_KEPT = ("tokenizer", "config.yaml", "manifest.json", "state.json", "eval/results.json", "report.html", "loss.png")


class Backend(Protocol):
    def create_version(self, v: Version, path_for: Any) -> Version: ...
    def get_version(self, owner: str, name: str, version: int) -> Version | None: ...
    def versions_of(self, owner: str, name: str) -> list[Version]: ...
    def names(self, owner: str) -> list[str]: ...
    def delete_version(self, owner: str, name: str, version: int) -> None: ...
    def get_alias(self, owner: str, name: str, alias: str) -> Alias | None: ...
    def aliases_of(self, owner: str, name: str) -> list[Alias]: ...
    def set_alias(self, owner: str, name: str, alias: str, split: dict[int, float], by: str, action: str) -> Alias: ...
    def remove_alias(self, owner: str, name: str, alias: str, by: str) -> None: ...
    def alias_history(self, owner: str, name: str, alias: str) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


def default_user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry (containers)
        return os.environ.get("USER", "unknown")


def run_weights(run: Path) -> tuple[str, Path]:
    """(kind, folder) of a run's final weights; a bare PEFT adapter or HF model folder is accepted too."""
    if (run / "adapter" / "adapter_config.json").is_file():
        return "adapter", run / "adapter"
    if (run / "model" / "config.json").is_file():
        return "model", run / "model"
    if (run / "adapter_config.json").is_file():
        return "adapter", run
    if (run / "config.json").is_file() and any(run.glob("*.safetensors")):
        return "model", run
    raise RegistryError(f"{run}: not a finished run folder (no adapter/ or model/ inside) nor a PEFT adapter or "
                        "Hugging Face model folder", status=400)


def _link_tree(src: Path, dst: Path) -> None:
    """Hard-link every file (same filesystem: instant, no extra space); copy where linking is refused."""
    for f in src.rglob("*"):
        if f.is_dir():
            continue
        t = dst / f.relative_to(src)
        t.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, t)
        except OSError:
            shutil.copy2(f, t)


def _sha256_files(files: list[Path]) -> str:
    h = hashlib.sha256()
    for f in sorted(files):
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _base_model(run: Path, kind: str, weights: Path) -> tuple[str | None, str | None]:
    """The base model id (as the run named it) and a hash of its weights where they are on this machine."""
    name: str | None = None
    cfg = run / "config.yaml"
    if cfg.is_file():
        raw = yaml.safe_load(cfg.read_text()) or {}
        name = (raw.get("model") or {}).get("name")
    if kind == "model":
        return name, _sha256_files(list(weights.glob("*.safetensors")))
    if name is None:
        try:
            name = json.loads((weights / "adapter_config.json").read_text()).get("base_model_name_or_path")
        except (OSError, ValueError):
            name = None
    if not name:
        return None, None
    folder = Path(name)
    if not folder.is_dir():
        from tunelab.model.loading import BUILTIN_MODELS, resolve_model
        from tunelab.model.names import builtin_for

        local = name if name in BUILTIN_MODELS else builtin_for(name)  # adapters record a built-in's hub id
        if local is None:
            return name, None  # a hub id: its hash is the hub's business; we do not download to hash it
        folder = Path(resolve_model(local).path)
    files = list(folder.glob("*.safetensors"))
    return name, _sha256_files(files) if files else None


def _metrics(run: Path) -> dict[str, Any]:
    out: dict[str, Any] = {}
    state = run / "state.json"
    if state.is_file():
        s = json.loads(state.read_text())
        for k in ("step", "best_valid", "best_step", "last_train_loss"):
            if s.get(k) is not None:
                out[k] = s[k]
    results = run / "eval" / "results.json"
    if results.is_file():
        r = json.loads(results.read_text())
        models = r.get("models") if isinstance(r, dict) else None
        if isinstance(models, dict):
            out["eval"] = {m: v.get("metrics", v) for m, v in models.items() if isinstance(v, dict)}
        elif isinstance(r, dict) and isinstance(r.get("metrics"), dict):
            out["eval"] = r["metrics"]
    return out


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix: d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    return out


def _sticky_pick(split: dict[int, float], key: str) -> int:
    # The same user always lands on the same side of a split (until the split changes): a hash of the user and
    # the alias maps to [0, 1), and the cumulative weights, in version order, cut that interval.
    x = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64
    acc = 0.0
    for v, w in sorted(split.items()):
        acc += w
        if x < acc:
            return v
    return max(split)


class Registry:
    """Versions, aliases and splits of named models, per owner. `Registry.open(data_dir, spec)` picks the backend:
    None -> SQLite in the data dir (the jobs store's database), a SQLAlchemy URL, or `mlflow:TRACKING_URI`."""

    def __init__(self, data_dir: str | Path, backend: Backend) -> None:
        self.data_dir = Path(data_dir)
        self.backend = backend

    @classmethod
    def open(cls, data_dir: str | Path, spec: str | None = None) -> Registry:
        data_dir = Path(data_dir).expanduser()
        data_dir.mkdir(parents=True, exist_ok=True)
        if spec and spec.startswith("mlflow:"):
            from tunelab.registry.mlflow_store import MLflowBackend

            return cls(data_dir, MLflowBackend(spec[len("mlflow:"):]))
        from tunelab.jobs.store import database_url
        from tunelab.registry.sql import SQLBackend

        return cls(data_dir, SQLBackend(database_url(data_dir, spec)))

    def close(self) -> None:
        self.backend.close()

    # ---------------------------------------------------------------- versions
    def add(self, name: str, run: str | Path, *, owner: str = "local", created_by: str | None = None,
            source: str | None = None, extra_metrics: dict[str, Any] | None = None,
            weights: str | Path | None = None, extra_lineage: dict[str, Any] | None = None) -> Version:
        """Register a run folder (or a bare adapter/model folder) as the next version of `name`. `weights`: serve
        this adapter/model folder instead of the run's final one (a checkpoint), keeping the run's lineage."""
        check_name(name)
        run = Path(run)
        if not run.is_dir():
            raise RegistryError(f"{run}: no such run folder", status=404, code="not_found")
        kind, weights = run_weights(Path(weights) if weights is not None else run)
        base, base_hash = _base_model(run, kind, weights)
        manifest: dict[str, Any] = {}
        if (run / "manifest.json").is_file():
            manifest = json.loads((run / "manifest.json").read_text())
        previous = self.backend.versions_of(owner, name)
        lineage = {
            "base_model": base, "base_weights_sha256": base_hash,
            "weights_sha256": _sha256_files([f for f in weights.iterdir() if f.suffix == ".safetensors"]),
            "config_sha256": manifest.get("config_sha256"),
            "data": {k: v.get("sha256") for k, v in (manifest.get("data") or {}).items() if isinstance(v, dict)},
            "versions": manifest.get("versions"),
            "parent": previous[-1].version if previous else None,
            **(extra_lineage or {}),
        }
        root = self.data_dir / "registry" / owner / name
        root.mkdir(parents=True, exist_ok=True)
        # Assemble in a temporary folder, then rename into place once the version number is known: a crash
        # leaves a stray .tmp folder, never a half-copied version.
        tmp = root / f".tmp-{os.getpid()}-{time.time_ns()}"
        _link_tree(weights, tmp / kind)
        for rel in _KEPT:
            p = run / rel
            if p.is_dir():
                _link_tree(p, tmp / rel)
            elif p.is_file():
                (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(p, tmp / rel)
        draft = Version(name=name, version=0, kind=kind, path="", created_at=int(time.time()),
                        created_by=created_by or (owner if owner != "local" else default_user()),
                        source=source or str(run.resolve()), lineage=lineage,
                        metrics={**_metrics(run), **(extra_metrics or {})}, owner=owner)
        try:
            v = self.backend.create_version(draft, lambda n: str(root / f"v{n}"))
            os.replace(tmp, v.path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return v

    def get(self, name: str, version: int, owner: str = "local") -> Version:
        v = self.backend.get_version(owner, check_name(name), version)
        if v is None:
            raise RegistryError(f"{name}@{version}: no such version", status=404, code="model_not_found")
        return v

    def versions(self, name: str, owner: str = "local") -> list[Version]:
        return self.backend.versions_of(owner, check_name(name))

    def names(self, owner: str = "local") -> list[str]:
        return self.backend.names(owner)

    def exists(self, name: str, owner: str = "local") -> bool:
        """Whether `owner` has a model called `name` (any version)."""
        return bool(self.backend.versions_of(owner, check_name(name)))

    def remove(self, name: str, version: int, owner: str = "local") -> None:
        v = self.get(name, version, owner)
        self.backend.delete_version(owner, name, version)  # refused while an alias points at it
        shutil.rmtree(v.path, ignore_errors=True)

    # ---------------------------------------------------------------- aliases and routing
    def alias(self, name: str, alias: str, version: int, *, owner: str = "local", by: str | None = None,
              action: str = "set") -> Alias:
        return self.backend.set_alias(owner, check_name(name), check_alias(alias), {version: 1.0},
                                      by or default_user(), action)

    def promote(self, name: str, version: int, alias: str = DEFAULT_ALIAS, **kw: Any) -> Alias:
        return self.alias(name, alias, version, action="promote", **kw)

    def route(self, name: str, alias: str, split: dict[int, float], *, owner: str = "local",
              by: str | None = None) -> Alias:
        if not split:
            raise RegistryError("a split needs at least one version")
        return self.backend.set_alias(owner, check_name(name), check_alias(alias), split, by or default_user(), "route")

    def rollback(self, name: str, alias: str = DEFAULT_ALIAS, *, owner: str = "local", by: str | None = None) -> Alias:
        """Move the alias back to what it pointed at before its current target."""
        current = self.backend.get_alias(owner, check_name(name), check_alias(alias))
        if current is None:
            raise RegistryError(f"{name} has no alias {alias!r} to roll back", status=404, code="model_not_found")
        past = [h["split"] for h in self.backend.alias_history(owner, name, alias) if h["split"]]
        while past and past[-1] == current.split:
            past.pop()
        if not past:
            raise RegistryError(f"{name}@{alias} has no earlier target to roll back to", status=409, code="conflict")
        return self.backend.set_alias(owner, name, alias, past[-1], by or default_user(), "rollback")

    def aliases(self, name: str, owner: str = "local") -> list[Alias]:
        return self.backend.aliases_of(owner, check_name(name))

    def history(self, name: str, alias: str, owner: str = "local") -> list[dict[str, Any]]:
        return self.backend.alias_history(owner, check_name(name), check_alias(alias))

    def resolve(self, ref: str | Ref, *, owner: str = "local", user: str | None = None) -> Version:
        """The version a reference serves now. An alias with a split picks by the OpenAI `user` field (sticky) or
        at random when the request names no user."""
        r = parse_ref(ref) if isinstance(ref, str) else ref
        if r.version is not None:
            return self.get(r.name, r.version, owner)
        alias = r.alias or DEFAULT_ALIAS
        a = self.backend.get_alias(owner, r.name, alias)
        if a is None:
            if not self.backend.versions_of(owner, r.name):
                raise RegistryError(f"model {r.name!r} is not in the registry", status=404, code="model_not_found")
            raise RegistryError(f"{r.name} has no alias {alias!r}: set one with `tunelab registry alias {r.name} "
                                f"{alias} VERSION`, or ask for {r.name}@VERSION", status=404, code="model_not_found")
        if a.single is not None:
            return self.get(r.name, a.single, owner)
        pick = (_sticky_pick(a.split, f"{owner}/{r.name}@{alias}/{user}") if user
                else random.choices(list(a.split), weights=list(a.split.values()))[0])
        return self.get(r.name, pick, owner)

    # ---------------------------------------------------------------- comparison
    def diff(self, a: str, b: str, owner: str = "local") -> dict[str, Any]:
        """Config, data and metrics of two versions side by side: only the keys whose values differ."""
        va, vb = self.resolve(a, owner=owner), self.resolve(b, owner=owner)

        def config(v: Version) -> dict[str, Any]:
            p = Path(v.path) / "config.yaml"
            return _flatten(yaml.safe_load(p.read_text()) or {}) if p.is_file() else {}

        def side(x: dict[str, Any], y: dict[str, Any]) -> dict[str, list[Any]]:
            return {k: [x.get(k), y.get(k)] for k in sorted(set(x) | set(y)) if x.get(k) != y.get(k)}

        return {"a": va.ref, "b": vb.ref, "config": side(config(va), config(vb)),
                "data": side(va.lineage.get("data") or {}, vb.lineage.get("data") or {}),
                "lineage": side({k: v for k, v in va.lineage.items() if k != "data"},
                                {k: v for k, v in vb.lineage.items() if k != "data"}),
                "metrics": side(_flatten(va.metrics), _flatten(vb.metrics))}
