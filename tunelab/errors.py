"""User-facing errors. Every error a user can cause is a TunelabError: the CLI prints its message and
exits with its code, never a traceback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_args

import yaml

if TYPE_CHECKING:
    from pydantic import BaseModel, ValidationError


class TunelabError(Exception):
    """An error caused by input or configuration; `exit_code` is what the CLI exits with."""

    exit_code: int = 1

    def __init__(self, message: str, exit_code: int | None = None) -> None:
        super().__init__(message)
        self.message = message
        if exit_code is not None:
            self.exit_code = exit_code


class ConfigError(TunelabError):
    exit_code = 2


def read_yaml(path: str | Path, what: str = "config file", mapping: bool = False) -> Any:
    """A YAML file's content, or a ConfigError naming the file: missing, a directory, not YAML (with yaml's
    line), or -- with `mapping` -- not a mapping at the top level."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found" if not p.exists() else f"{p}: is a directory, not a {what}")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if mapping and not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    return raw


@dataclass(frozen=True)
class Issue:
    """One problem found in a data file. `line` is 1-based; `field` is a JSON path like messages[2].role."""

    file: str
    line: int | None
    field: str | None
    message: str
    severity: str = "error"  # "error" | "warning"

    def __str__(self) -> str:
        where = self.file
        if self.line is not None:
            where += f":{self.line}"
        if self.field:
            where += f" [{self.field}]"
        return f"{where}: {self.severity}: {self.message}"


class DataError(TunelabError):
    """Bad data: carries every issue found so the user can fix them all in one pass."""

    def __init__(self, issues: list[Issue], header: str = "invalid data") -> None:
        errors = [i for i in issues if i.severity == "error"]
        shown = "\n".join(f"  {i}" for i in errors[:50])
        more = f"\n  ... and {len(errors) - 50} more" if len(errors) > 50 else ""
        super().__init__(f"{header}: {len(errors)} error(s)\n{shown}{more}", exit_code=1)
        self.issues = issues


def _models_in(ann: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation holds (X, X | None, list[X], a discriminated union of several)."""
    from pydantic import BaseModel

    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return [ann]
    return [m for a in get_args(ann) for m in _models_in(a)]


def format_validation_error(e: ValidationError, source: str, root: type[BaseModel], prefix: str = "",
                            what: str = "configuration") -> str:
    """The one formatter for every config section: `SOURCE: invalid WHAT`, then one line per problem with its
    dotted key (under `prefix`, e.g. "eval." for the eval section) and, for an unknown key, the nearest valid
    one."""
    import difflib

    lines = [f"{source}: invalid {what}"]
    for err in e.errors():
        # A discriminated union puts the tag before the member's own field of the same name (steps.0.dedup.dedup)
        loc = tuple(p for i, p in enumerate(err["loc"]) if i == 0 or p != err["loc"][i - 1])
        dotted = prefix + ".".join(str(p) for p in loc)
        if err["type"] != "extra_forbidden":
            lines.append(f"  {dotted or '(top level)'}: {err['msg']}")
            continue
        models: list[type[BaseModel]] = [root]
        for part in loc[:-1]:
            nxt = [m for c in models if (f := c.model_fields.get(str(part))) is not None for m in _models_in(f.annotation)]
            models = nxt or models  # a list index or a union's tag names no field: stay
        options = [k for m in models for k in m.model_fields]
        close = difflib.get_close_matches(str(loc[-1]), options, n=1, cutoff=0.5)
        lines.append(f"  {dotted}: unknown key" + (f" (did you mean {close[0]!r}?)" if close else ""))
    return "\n".join(lines)
