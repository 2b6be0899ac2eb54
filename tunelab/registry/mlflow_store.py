"""The registry on MLflow's Model Registry (`--registry mlflow:TRACKING_URI`), for teams that already use MLflow.

Each tunelab name is an MLflow registered model (owner other than `local` prefixes it: `OWNER--NAME`), each version
an MLflow model version whose `source` is the version's folder in the data dir, with lineage and metrics as JSON
tags. A plain alias is MLflow's own alias; a weighted split (which MLflow has no notion of) and the alias history
are JSON tags on the registered model, and MLflow's alias points at the split's largest share.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from tunelab.registry.types import Alias, RegistryError, Version

_HISTORY_KEEP = 50


class MLflowBackend:
    def __init__(self, tracking_uri: str) -> None:
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def close(self) -> None:
        pass

    @staticmethod
    def _model(owner: str, name: str) -> str:
        return name if owner == "local" else f"{owner}--{name}"

    def _registered(self, owner: str, name: str) -> Any | None:
        from mlflow.exceptions import MlflowException

        try:
            return self.client.get_registered_model(self._model(owner, name))
        except MlflowException:
            return None

    @staticmethod
    def _version(owner: str, name: str, mv: Any) -> Version:
        t = mv.tags or {}
        return Version(name=name, version=int(mv.version), kind=t.get("tunelab.kind", "adapter"),
                       path=t.get("tunelab.path", mv.source), created_at=int(mv.creation_timestamp // 1000),
                       created_by=t.get("tunelab.created_by", ""), source=t.get("tunelab.source", ""),
                       lineage=json.loads(t.get("tunelab.lineage", "{}")),
                       metrics=json.loads(t.get("tunelab.metrics", "{}")), owner=owner)

    # ---------------------------------------------------------------- versions
    def create_version(self, v: Version, path_for: Callable[[int], str]) -> Version:
        model = self._model(v.owner, v.name)
        if self._registered(v.owner, v.name) is None:
            self.client.create_registered_model(model, tags={"tunelab.owner": v.owner})
        # MLflow numbers versions itself; the folder is named after that number, so the source is set from it.
        n = max((int(m.version) for m in self.client.search_model_versions(f"name='{model}'")), default=0) + 1
        final = replace(v, version=n, path=path_for(n))
        tags = {"tunelab.kind": v.kind, "tunelab.path": final.path, "tunelab.created_by": v.created_by,
                "tunelab.source": v.source, "tunelab.lineage": json.dumps(v.lineage),
                "tunelab.metrics": json.dumps(v.metrics)}
        mv = self.client.create_model_version(model, source=final.path, tags=tags,
                                              description=f"registered by tunelab from {v.source}")
        if int(mv.version) != n:  # someone registered concurrently: keep MLflow's number
            final = replace(final, version=int(mv.version), path=path_for(int(mv.version)))
            self.client.set_model_version_tag(model, mv.version, "tunelab.path", final.path)
        return final

    def get_version(self, owner: str, name: str, version: int) -> Version | None:
        from mlflow.exceptions import MlflowException

        try:
            mv = self.client.get_model_version(self._model(owner, name), str(version))
        except MlflowException:
            return None
        return self._version(owner, name, mv)

    def versions_of(self, owner: str, name: str) -> list[Version]:
        if self._registered(owner, name) is None:
            return []
        mvs = self.client.search_model_versions(f"name='{self._model(owner, name)}'")
        return sorted((self._version(owner, name, m) for m in mvs), key=lambda v: v.version)

    def names(self, owner: str) -> list[str]:
        out = []
        for rm in self.client.search_registered_models():
            if (rm.tags or {}).get("tunelab.owner", "local") != owner:
                continue
            out.append(rm.name if owner == "local" else rm.name.split("--", 1)[1])
        return sorted(out)

    def delete_version(self, owner: str, name: str, version: int) -> None:
        held = [a.alias for a in self.aliases_of(owner, name) if version in a.split]
        if held:
            raise RegistryError(f"{name}@{version} is still the target of alias(es) {', '.join(held)}: move them "
                                "first", status=409, code="conflict")
        self.client.delete_model_version(self._model(owner, name), str(version))

    # ---------------------------------------------------------------- aliases
    def _tags(self, owner: str, name: str) -> dict[str, str]:
        rm = self._registered(owner, name)
        return dict(rm.tags or {}) if rm is not None else {}

    def get_alias(self, owner: str, name: str, alias: str) -> Alias | None:
        raw = self._tags(owner, name).get(f"tunelab.split.{alias}")
        if not raw:
            return None
        d = json.loads(raw)
        return Alias(name=name, alias=alias, split={int(k): float(w) for k, w in d["split"].items()},
                     updated_by=d["by"], updated_at=d["at"])

    def aliases_of(self, owner: str, name: str) -> list[Alias]:
        keys = sorted(k[len("tunelab.split."):] for k in self._tags(owner, name) if k.startswith("tunelab.split."))
        out = [self.get_alias(owner, name, k) for k in keys]
        return [a for a in out if a is not None]

    def set_alias(self, owner: str, name: str, alias: str, split: dict[int, float], by: str, action: str) -> Alias:
        missing = [v for v in split if self.get_version(owner, name, v) is None]
        if missing:
            raise RegistryError(f"{name}: no version {', '.join(map(str, sorted(missing)))}", status=404,
                                code="model_not_found")
        model, at = self._model(owner, name), int(time.time())
        self.client.set_registered_model_tag(model, f"tunelab.split.{alias}", json.dumps(
            {"split": {str(k): w for k, w in split.items()}, "by": by, "at": at}))
        self.client.set_registered_model_alias(model, alias, str(max(split, key=lambda k: split[k])))
        self._append_history(owner, name, alias, {"split": {str(k): w for k, w in split.items()}, "by": by, "at": at,
                                                  "action": action})
        return Alias(name=name, alias=alias, split=dict(split), updated_by=by, updated_at=at)

    def remove_alias(self, owner: str, name: str, alias: str, by: str) -> None:
        if self.get_alias(owner, name, alias) is None:
            raise RegistryError(f"{name} has no alias {alias!r}", status=404, code="model_not_found")
        model = self._model(owner, name)
        self.client.delete_registered_model_tag(model, f"tunelab.split.{alias}")
        self.client.delete_registered_model_alias(model, alias)
        self._append_history(owner, name, alias, {"split": {}, "by": by, "at": int(time.time()), "action": "remove"})

    def _append_history(self, owner: str, name: str, alias: str, entry: dict[str, Any]) -> None:
        key = f"tunelab.history.{alias}"
        past = json.loads(self._tags(owner, name).get(key, "[]"))
        past = (past + [entry])[-_HISTORY_KEEP:]
        self.client.set_registered_model_tag(self._model(owner, name), key, json.dumps(past))

    def alias_history(self, owner: str, name: str, alias: str) -> list[dict[str, Any]]:
        past = json.loads(self._tags(owner, name).get(f"tunelab.history.{alias}", "[]"))
        return [{**h, "split": {int(k): w for k, w in h["split"].items()}} for h in past]
