"""`tunelab registry ...`: add, list, show, diff, remove, alias, promote, rollback, route. Thin: each command is a
call on `Registry`; `--json` prints what the Python API returns."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from tunelab.engine.cli import default_data_dir  # the same data dir as `tunelab serve`
from tunelab.registry.core import Registry
from tunelab.registry.types import DEFAULT_ALIAS, LOCAL_OWNER, RegistryError, parse_ref, parse_split

registry_app = typer.Typer(no_args_is_help=True, help="Versioned models: register runs, aliases, A/B splits.")


DataDir = Annotated[Path | None, typer.Option("--data-dir", help="data dir (default: $XDG_DATA_HOME/tunelab)")]
Spec = Annotated[str | None, typer.Option("--registry", help="storage: a SQLAlchemy URL or mlflow:TRACKING_URI "
                                                             "(default: the data dir's SQLite database)")]
AsJson = Annotated[bool, typer.Option("--json", help="print JSON")]
Owner = Annotated[str, typer.Option("--owner", help="whose names: an API key's owner on `tunelab serve` "
                                                    "(default local: the CLI's, served when the server has no keys)")]


def _open(data_dir: Path | None, spec: str | None) -> Registry:
    return Registry.open(data_dir or default_data_dir(), spec)


def _print(obj: Any, as_json: bool, text: str) -> None:
    typer.echo(json.dumps(obj, indent=1, default=str) if as_json else text)


def add(name: str, run: Path, data_dir: DataDir = None, registry: Spec = None, owner: Owner = LOCAL_OWNER, as_json: AsJson = False) -> None:
    """Register RUN (a finished run folder) as the next version of NAME."""
    reg = _open(data_dir, registry)
    v = reg.add(name, run, owner=owner)
    _print(v.to_dict(), as_json, f"registered {v.ref} ({v.kind}, base {v.lineage.get('base_model')}) at {v.path}")


def list_cmd(name: Annotated[str | None, typer.Argument()] = None, data_dir: DataDir = None,
             registry: Spec = None, owner: Owner = LOCAL_OWNER, as_json: AsJson = False) -> None:
    """Names, or one name's versions with their aliases."""
    reg = _open(data_dir, registry)
    if name is None:
        names = reg.names(owner)
        _print(names, as_json, "\n".join(names) or "(the registry is empty)")
        return
    aliases = reg.aliases(name, owner)
    vs = reg.versions(name, owner)
    if not vs:
        raise RegistryError(f"model {name!r} is not in the registry", status=404)
    rows = []
    for v in vs:
        held = [a.alias + ("" if a.single else f" {a.split[v.version]:.0%}") for a in aliases if v.version in a.split]
        rows.append({**v.to_dict(), "aliases": held})
    text = "\n".join(f"{r['name']}@{r['version']}  {r['kind']:7} by {r['created_by']:10} "
                     f"{' '.join(r['aliases'])}" for r in rows)
    _print(rows, as_json, text)


def show(ref: str, data_dir: DataDir = None, registry: Spec = None, owner: Owner = LOCAL_OWNER, as_json: AsJson = False) -> None:
    """One version (NAME@V, NAME@ALIAS, or NAME for its production alias): lineage, metrics, folder."""
    reg = _open(data_dir, registry)
    v = reg.resolve(ref, owner=owner)
    _print(v.to_dict(), as_json, json.dumps(v.to_dict(), indent=1, default=str))


def diff(a: str, b: str, data_dir: DataDir = None, registry: Spec = None, owner: Owner = LOCAL_OWNER, as_json: AsJson = False) -> None:
    """Config, data and metrics of two versions side by side (only what differs)."""
    d = _open(data_dir, registry).diff(a, b, owner)
    lines = [f"{'':40} {d['a']:>20} {d['b']:>20}"]
    for section in ("config", "data", "lineage", "metrics"):
        for k, (x, y) in d[section].items():
            lines.append(f"{section + '.' + k:40.40} {str(x)[:20]:>20} {str(y)[:20]:>20}")
    _print(d, as_json, "\n".join(lines) if len(lines) > 1 else f"{d['a']} and {d['b']}: no differences")


def remove(ref: str, data_dir: DataDir = None, registry: Spec = None, owner: Owner = LOCAL_OWNER) -> None:
    """Remove NAME@V and its files (refused while an alias points at it)."""
    r = parse_ref(ref)
    if r.version is None:
        raise RegistryError("remove takes NAME@VERSION")
    _open(data_dir, registry).remove(r.name, r.version, owner)
    typer.echo(f"removed {r}")


def alias(name: str, alias_name: Annotated[str, typer.Argument(metavar="ALIAS")], version: int,
          data_dir: DataDir = None, registry: Spec = None, owner: Owner = LOCAL_OWNER) -> None:
    """Point ALIAS of NAME at VERSION."""
    a = _open(data_dir, registry).alias(name, alias_name, version, owner=owner)
    typer.echo(f"{name}@{a.alias} -> {version}")


def promote(name: str, version: int, to: Annotated[str, typer.Option(help="the alias to move")] = DEFAULT_ALIAS,
            data_dir: DataDir = None, registry: Spec = None, owner: Owner = LOCAL_OWNER) -> None:
    """Move the production alias (or --to ALIAS) to VERSION."""
    a = _open(data_dir, registry).promote(name, version, alias=to, owner=owner)
    typer.echo(f"{name}@{a.alias} -> {version}")


def rollback(name: str, alias_name: Annotated[str, typer.Argument(metavar="ALIAS")] = DEFAULT_ALIAS,
             data_dir: DataDir = None, registry: Spec = None, owner: Owner = LOCAL_OWNER) -> None:
    """Move ALIAS back to its previous target."""
    a = _open(data_dir, registry).rollback(name, alias_name, owner=owner)
    typer.echo(f"{name}@{a.alias} -> {', '.join(f'{v}={w:.0%}' for v, w in a.split.items())}")


def route(name: str, alias_name: Annotated[str, typer.Argument(metavar="ALIAS")],
          split: Annotated[str, typer.Option(help="VERSION=WEIGHT,... e.g. 1=90,2=10")],
          data_dir: DataDir = None, registry: Spec = None, owner: Owner = LOCAL_OWNER) -> None:
    """Split ALIAS across versions by weight (sticky per OpenAI `user`)."""
    a = _open(data_dir, registry).route(name, alias_name, parse_split(split), owner=owner)
    typer.echo(f"{name}@{a.alias} -> {', '.join(f'{v}={w:.0%}' for v, w in a.split.items())}")


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    for fn, cmd in ((add, "add"), (list_cmd, "list"), (show, "show"), (diff, "diff"), (remove, "remove"),
                    (alias, "alias"), (promote, "promote"), (rollback, "rollback"), (route, "route")):
        registry_app.command(cmd)(fn)
    app.add_typer(registry_app, name="registry")
