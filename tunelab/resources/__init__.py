"""The files shipped inside the package, found with `importlib.resources` so that an installed wheel (not only a
checkout) has them: `configs/` (the example run configs, each parsed by a test; `tunelab init` copies one out)
and the bundled data sets `clinical/`, `general/` and `preference/` (each written by the generator its module
names). Paths inside a shipped config are relative to the config's folder (`../clinical/train.jsonl`), like
any config file's.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from tunelab.errors import TunelabError

# Short names `tunelab init` and `tunelab demo` accept for a shipped config besides its file stem.
ALIASES = {"demo": "demo_clinical_lora"}


def resource(*parts: str) -> Path:
    """The on-disk path of a bundled file or folder, e.g. `resource("clinical", "train.jsonl")`."""
    root = files(__name__)
    if not isinstance(root, Path):
        # A zip import (zipapp, zipped egg) has no folder the training code could read; wheels install as files.
        raise TunelabError(f"tunelab's bundled files are not on disk ({root}); install tunelab from a wheel", 2)
    return root.joinpath(*parts)


def config_names() -> list[str]:
    """The stems of the shipped example configs (`dpo`, `sft_qlora`, ...), sorted."""
    return sorted(p.stem for p in resource("configs").glob("*.yaml"))


def config_path(name: str) -> Path:
    """A shipped example config by stem or alias (`demo`); an unknown name lists the known ones."""
    stem = ALIASES.get(name, name.removesuffix(".yaml"))
    p = resource("configs", f"{stem}.yaml")
    if not p.is_file():
        known = ", ".join([*ALIASES, *config_names()])
        raise TunelabError(f"no example config named {name!r} (known: {known})", 2)
    return p
