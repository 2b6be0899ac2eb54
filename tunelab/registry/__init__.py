"""Model registry: named models with numbered versions (weights + lineage), aliases and A/B splits.

`Registry.open(data_dir, spec)` is the Python API; `tunelab registry ...` (tunelab/registry/cli.py) the CLI.
"""

from tunelab.registry.core import Registry
from tunelab.registry.types import DEFAULT_ALIAS, Alias, Ref, RegistryError, Version, parse_ref, parse_split

__all__ = ["DEFAULT_ALIAS", "Alias", "Ref", "Registry", "RegistryError", "Version", "parse_ref", "parse_split"]
