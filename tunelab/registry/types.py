"""The registry's vocabulary: model references (`NAME`, `NAME@3`, `NAME@staging`), versions, and alias routes.

Pure data and parsing, no storage: both backends (SQL, MLflow) and the server share these.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from tunelab.errors import TunelabError

DEFAULT_ALIAS = "production"
LOCAL_OWNER = "local"  # the CLI's owner, and the server's when it runs without API keys
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_ALIAS = re.compile(r"^[A-Za-z][A-Za-z0-9_-]{0,63}$")


class RegistryError(TunelabError):
    """A registry request that cannot be done (unknown name/version/alias, a refused removal...).
    `status` is the HTTP status the server answers with."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message, exit_code=1)
        self.status = status
        self.code = code


def registry_owner(owner: str, keyed: bool = True) -> str:
    """The registry owner of an API owner (a key's owner, a job's owner): `local` when the server has no keys
    (its requests and jobs are "anonymous"), so the CLI's registry is the one served."""
    return owner if keyed and owner != "anonymous" else LOCAL_OWNER


def check_name(name: str) -> str:
    # Names become folder names and URL parts: ASCII, no separators, no `..`.
    if not _NAME.match(name) or ".." in name:
        raise RegistryError(f"model name {name!r} is not allowed: use 1-100 ASCII letters, digits, '.', '_' or '-', "
                            "starting with a letter or digit, without '..'")
    return name


def check_alias(alias: str) -> str:
    if not _ALIAS.match(alias) or alias.isdigit():
        raise RegistryError(f"alias {alias!r} is not allowed: use 1-64 ASCII letters, digits, '_' or '-', starting "
                            "with a letter")
    return alias


@dataclass(frozen=True)
class Ref:
    """A parsed model reference: a version number, an alias, or neither (the default alias)."""

    name: str
    version: int | None = None
    alias: str | None = None

    def __str__(self) -> str:
        if self.version is not None:
            return f"{self.name}@{self.version}"
        return f"{self.name}@{self.alias or DEFAULT_ALIAS}"


def parse_ref(text: str) -> Ref:
    """`NAME` -> its production alias; `NAME@3` -> version 3; `NAME@staging` -> that alias."""
    name, sep, tail = text.partition("@")
    check_name(name)
    if not sep:
        return Ref(name)
    if tail.isdigit():
        if int(tail) < 1:
            raise RegistryError(f"{text!r}: versions start at 1")
        return Ref(name, version=int(tail))
    return Ref(name, alias=check_alias(tail))


@dataclass(frozen=True)
class Version:
    """One registered version: where its weights are and where they came from."""

    name: str
    version: int
    kind: str  # "adapter" (PEFT folder) or "model" (a full HF model folder)
    path: str  # the version's folder in the data dir: adapter/ or model/, tokenizer/, config.yaml, ...
    created_at: int
    created_by: str
    source: str  # the run folder it was registered from
    lineage: dict[str, Any] = field(default_factory=dict)  # base model + hash, data hashes, config hash, parent
    metrics: dict[str, Any] = field(default_factory=dict)
    owner: str = "local"

    @property
    def ref(self) -> str:
        return f"{self.name}@{self.version}"

    @property
    def weights_dir(self) -> str:
        return f"{self.path}/{self.kind}"

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "kind": self.kind, "path": self.path,
                "created_at": self.created_at, "created_by": self.created_by, "source": self.source,
                "lineage": self.lineage, "metrics": self.metrics, "owner": self.owner}


@dataclass(frozen=True)
class Alias:
    """An alias: one version, or a weighted split across versions (A/B), with who moved it last and when."""

    name: str
    alias: str
    split: dict[int, float]  # version -> weight; one entry for a plain alias
    updated_by: str
    updated_at: int

    @property
    def single(self) -> int | None:
        return next(iter(self.split)) if len(self.split) == 1 else None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "alias": self.alias, "split": {str(k): v for k, v in self.split.items()},
                "updated_by": self.updated_by, "updated_at": self.updated_at}


def parse_split(text: str) -> dict[int, float]:
    """`1=90,2=10` -> {1: 0.9, 2: 0.1} (weights normalised; each must be positive)."""
    out: dict[int, float] = {}
    for part in text.split(","):
        v, eq, w = part.strip().partition("=")
        if not eq or not v.strip().isdigit():
            raise RegistryError(f"--split {text!r}: expected VERSION=WEIGHT pairs like 1=90,2=10")
        try:
            weight = float(w)
        except ValueError:
            raise RegistryError(f"--split {text!r}: weight {w!r} is not a number") from None
        if not weight > 0 or weight == float("inf"):
            raise RegistryError(f"--split {text!r}: weights must be positive and finite")
        if int(v) in out:
            raise RegistryError(f"--split {text!r}: version {v} is named twice")
        out[int(v)] = weight
    total = sum(out.values())
    return {k: w / total for k, w in out.items()}
