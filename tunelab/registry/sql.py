"""The registry's default storage: tables beside the jobs API's in the same SQL database (SQLite in the data dir,
or any SQLAlchemy URL such as PostgreSQL), reusing the jobs store's engine setup.

Alias moves are one transaction each (the alias row and its history row together), so a reader sees the old
target or the new one, never neither.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from sqlalchemy import (
    JSON,
    Column,
    Float,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    UniqueConstraint,
    delete,
    func,
    insert,
    select,
)
from sqlalchemy.exc import IntegrityError

from tunelab.jobs.store import Store, now
from tunelab.registry.types import Alias, RegistryError, Version

metadata = MetaData()

versions = Table(
    "registry_versions", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("owner", String(200), nullable=False),
    Column("name", String(100), nullable=False),
    Column("version", Integer, nullable=False),
    Column("kind", String(16), nullable=False),
    Column("path", String(2048), nullable=False),
    Column("created_at", Integer, nullable=False),
    Column("created_by", String(200), nullable=False),
    Column("source", String(2048), nullable=False),
    Column("lineage", JSON, nullable=False),
    Column("metrics", JSON, nullable=False),
    UniqueConstraint("owner", "name", "version", name="uq_registry_version"),
)

# One row per (alias, version) share of a split; a plain alias has one row of weight 1.
aliases = Table(
    "registry_aliases", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("owner", String(200), nullable=False),
    Column("name", String(100), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("version", Integer, nullable=False),
    Column("weight", Float, nullable=False),
    Column("updated_by", String(200), nullable=False),
    Column("updated_at", Integer, nullable=False),
    Index("ix_registry_alias", "owner", "name", "alias"),
)

history = Table(
    "registry_alias_history", metadata,
    Column("seq", Integer, primary_key=True, autoincrement=True),
    Column("owner", String(200), nullable=False),
    Column("name", String(100), nullable=False),
    Column("alias", String(64), nullable=False),
    Column("split", String(1000), nullable=False),  # JSON {version: weight}; "{}" when removed
    Column("by", String(200), nullable=False),
    Column("at", Integer, nullable=False),
    Column("action", String(32), nullable=False),
)


def _version(r: Any) -> Version:
    return Version(name=r["name"], version=r["version"], kind=r["kind"], path=r["path"], created_at=r["created_at"],
                   created_by=r["created_by"], source=r["source"], lineage=dict(r["lineage"] or {}),
                   metrics=dict(r["metrics"] or {}), owner=r["owner"])


class SQLBackend:
    """Registry rows in a SQL database; `url` as the jobs store takes it."""

    def __init__(self, url: str) -> None:
        self.store = Store(url)
        metadata.create_all(self.store.engine)
        self.url = url

    def close(self) -> None:
        self.store.close()

    # ---------------------------------------------------------------- versions
    def create_version(self, v: Version, path_for: Callable[[int], str]) -> Version:
        """Insert `v` as the next version of its name (the number is chosen inside the insert's transaction;
        another process racing on the same name hits the unique constraint and we take the next number)."""
        for _ in range(20):
            try:
                with self.store.write() as c:
                    top = c.execute(select(func.max(versions.c.version))
                                    .where(versions.c.owner == v.owner, versions.c.name == v.name)).scalar()
                    n = int(top or 0) + 1
                    final = replace(v, version=n, path=path_for(n))
                    c.execute(insert(versions).values(**final.to_dict()))
                return final
            except IntegrityError:
                continue
        raise RegistryError(f"{v.name}: too many concurrent registrations; try again", status=409, code="conflict")

    def get_version(self, owner: str, name: str, version: int) -> Version | None:
        with self.store.read() as c:
            r = c.execute(select(versions).where(versions.c.owner == owner, versions.c.name == name,
                                                 versions.c.version == version)).mappings().first()
        return _version(r) if r else None

    def versions_of(self, owner: str, name: str) -> list[Version]:
        with self.store.read() as c:
            rows = c.execute(select(versions).where(versions.c.owner == owner, versions.c.name == name)
                             .order_by(versions.c.version)).mappings()
            return [_version(r) for r in rows]

    def names(self, owner: str) -> list[str]:
        with self.store.read() as c:
            return [r[0] for r in c.execute(select(versions.c.name).where(versions.c.owner == owner)
                                            .group_by(versions.c.name).order_by(versions.c.name))]

    def delete_version(self, owner: str, name: str, version: int) -> None:
        with self.store.write() as c:
            # Checked inside the same transaction as the delete: an alias set concurrently cannot be orphaned.
            held = c.execute(select(aliases.c.alias).where(aliases.c.owner == owner, aliases.c.name == name,
                                                           aliases.c.version == version)).scalars().all()
            if held:
                raise RegistryError(f"{name}@{version} is still the target of alias(es) {', '.join(sorted(set(held)))}: "
                                    "move them first", status=409, code="conflict")
            c.execute(delete(versions).where(versions.c.owner == owner, versions.c.name == name,
                                             versions.c.version == version))

    # ---------------------------------------------------------------- aliases
    def get_alias(self, owner: str, name: str, alias: str) -> Alias | None:
        with self.store.read() as c:
            rows = list(c.execute(select(aliases).where(aliases.c.owner == owner, aliases.c.name == name,
                                                        aliases.c.alias == alias)
                                  .order_by(aliases.c.version)).mappings())
        if not rows:
            return None
        return Alias(name=name, alias=alias, split={r["version"]: r["weight"] for r in rows},
                     updated_by=rows[0]["updated_by"], updated_at=rows[0]["updated_at"])

    def aliases_of(self, owner: str, name: str) -> list[Alias]:
        with self.store.read() as c:
            names = c.execute(select(aliases.c.alias).where(aliases.c.owner == owner, aliases.c.name == name)
                              .group_by(aliases.c.alias).order_by(aliases.c.alias)).scalars().all()
        out = [self.get_alias(owner, name, a) for a in names]
        return [a for a in out if a is not None]

    def set_alias(self, owner: str, name: str, alias: str, split: dict[int, float], by: str, action: str) -> Alias:
        at = now()
        with self.store.write() as c:
            have = set(c.execute(select(versions.c.version).where(
                versions.c.owner == owner, versions.c.name == name,
                versions.c.version.in_(list(split)))).scalars().all())
            missing = sorted(set(split) - have)
            if missing:
                raise RegistryError(f"{name}: no version {', '.join(map(str, missing))}", status=404,
                                    code="model_not_found")
            c.execute(delete(aliases).where(aliases.c.owner == owner, aliases.c.name == name, aliases.c.alias == alias))
            for v, w in split.items():
                c.execute(insert(aliases).values(owner=owner, name=name, alias=alias, version=v, weight=w,
                                                 updated_by=by, updated_at=at))
            c.execute(insert(history).values(owner=owner, name=name, alias=alias, by=by, at=at, action=action,
                                             split=json.dumps({str(k): w for k, w in split.items()})))
        return Alias(name=name, alias=alias, split=dict(split), updated_by=by, updated_at=at)

    def remove_alias(self, owner: str, name: str, alias: str, by: str) -> None:
        with self.store.write() as c:
            n = c.execute(delete(aliases).where(aliases.c.owner == owner, aliases.c.name == name,
                                                aliases.c.alias == alias)).rowcount
            if not n:
                raise RegistryError(f"{name} has no alias {alias!r}", status=404, code="model_not_found")
            c.execute(insert(history).values(owner=owner, name=name, alias=alias, by=by, at=now(), action="remove",
                                             split="{}"))

    def alias_history(self, owner: str, name: str, alias: str) -> list[dict[str, Any]]:
        with self.store.read() as c:
            rows = c.execute(select(history).where(history.c.owner == owner, history.c.name == name,
                                                   history.c.alias == alias).order_by(history.c.seq)).mappings()
            return [{"split": {int(k): w for k, w in json.loads(r["split"]).items()}, "by": r["by"], "at": r["at"],
                     "action": r["action"]} for r in rows]
