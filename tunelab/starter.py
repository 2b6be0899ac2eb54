"""`tunelab init [TEMPLATE] DIR`: a folder to start from -- one of the shipped example configs, plus the bundled
data it trains on, copied under DIR/data/ with the config's paths pointing there. Runs as written
(`tunelab train DIR/TEMPLATE.yaml`); then swap in your own data and model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from tunelab.config_paths import FOLDER_RELATIVE, walk
from tunelab.errors import ConfigError, TunelabError, read_yaml
from tunelab.resources import ALIASES, config_names, config_path, resource

DEFAULT_TEMPLATE = "demo"


@dataclass
class Started:
    config: Path
    written: list[Path] = field(default_factory=list)
    unchanged: list[Path] = field(default_factory=list)


def _bundled_inputs(cfg_file: Path) -> dict[str, Path]:
    """The config's path values (as written) that point at bundled files, with those files."""
    raw = read_yaml(cfg_file, mapping=True)
    root = resource()
    found: dict[str, Path] = {}

    def note(value: str) -> str:
        p = (cfg_file.parent / value).resolve()
        if p.is_file() and p.is_relative_to(root.resolve()):
            found[value] = p
        return value

    for key in FOLDER_RELATIVE:
        walk(raw, key.split("."), note)
    return found


def _put(dest: Path, content: bytes, force: bool, res: Started) -> None:
    if dest.exists():
        if dest.is_file() and dest.read_bytes() == content:
            res.unchanged.append(dest)
            return
        if not force:
            raise TunelabError(f"{dest} exists and differs from the template's; pass --force to replace it", 2)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    tmp.write_bytes(content)
    tmp.replace(dest)
    res.written.append(dest)


def init_project(template: str, dest_dir: str | Path, *, force: bool = False) -> Started:
    """Copy the shipped config `template` (a stem such as `dpo`, or `demo`) into `dest_dir` with the bundled
    data it names under `dest_dir/data/`, its paths rewritten to point there. Existing identical files are
    left alone; a different one is an error unless `force`."""
    src = config_path(template)
    dest = Path(dest_dir)
    if dest.exists() and not dest.is_dir():
        raise TunelabError(f"{dest}: exists and is not a folder", 2)
    text = src.read_text(encoding="utf-8")
    res = Started(config=dest / src.name)
    root = resource().resolve()
    # Longest first, so that no value is rewritten inside a longer one.
    for value, file in sorted(_bundled_inputs(src).items(), key=lambda kv: -len(kv[0])):
        rel = Path("data") / file.relative_to(root)
        _put(dest / rel, file.read_bytes(), force, res)
        text = text.replace(value, rel.as_posix())
    _put(res.config, text.encode("utf-8"), force, res)
    from tunelab.config import load_config

    try:
        load_config(res.config)  # what was written must load and find its data
    except ConfigError as e:  # pragma: no cover - a template that fails here is a bug in the template
        raise TunelabError(f"tunelab init wrote a config that does not load: {e.message}", 1) from None
    return res


def _templates_text() -> str:
    aliases = {v: k for k, v in ALIASES.items()}
    return "\n".join(f"  {name}" + (f" (or {aliases[name]})" if name in aliases else "") for name in config_names())


def init_cmd(
    args: Annotated[list[str] | None, typer.Argument(metavar="[TEMPLATE] DIR",
                                                     help=f"template (default: {DEFAULT_TEMPLATE}) and folder")] = None,
    force: Annotated[bool, typer.Option(help="replace files that exist and differ")] = False,
    list_: Annotated[bool, typer.Option("--list", help="list the templates")] = False,
) -> None:
    """Start a project from an example config (and the bundled data it trains on): tunelab init [TEMPLATE] DIR."""
    if list_:
        typer.echo("templates (the shipped example configs):\n" + _templates_text())
        return
    if not args or len(args) > 2:
        raise TunelabError("usage: tunelab init [TEMPLATE] DIR  (templates: tunelab init --list)", 2)
    template, dest = (DEFAULT_TEMPLATE, args[0]) if len(args) == 1 else (args[0], args[1])
    res = init_project(template, dest, force=force)
    for p in res.written:
        typer.echo(f"wrote {p}")
    for p in res.unchanged:
        typer.echo(f"kept {p} (already the same)")
    typer.echo(f"next: tunelab train {res.config}   (paths in it are relative to {Path(dest)}/; "
               "output_dir to the current directory)")


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    app.command("init")(init_cmd)
