"""Model registry: named models with numbered versions (weights + lineage), aliases and A/B splits.

`Registry.open(data_dir, spec)` is the Python API; `tunelab registry ...` (tunelab/registry/cli.py) the CLI.
"""

from tunelab.registry.core import Registry
from tunelab.registry.types import (
    DEFAULT_ALIAS,
    LOCAL_OWNER,
    Alias,
    Ref,
    RegistryError,
    Version,
    parse_ref,
    parse_split,
    registry_owner,
)

__all__ = ["DEFAULT_ALIAS", "LOCAL_OWNER", "Alias", "Ref", "Registry", "RegistryError", "Version", "parse_ref",
           "parse_split", "registry_owner"]
