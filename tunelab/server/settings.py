"""Server settings: API keys (owner keys and admin keys) and request limits. Frozen and typed; built by the
CLI or by tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import ConfigError


class ServerSettings(BaseModel):
    """`api_keys` maps each accepted bearer key to its owner's name; empty means no authentication."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_keys: dict[str, str] = Field(default_factory=dict)
    admin_keys: frozenset[str] = Field(default_factory=frozenset,
                                       description="keys (also in api_keys) that may read /health's details")
    max_request_bytes: int = Field(default=1_000_000, gt=0, description="larger request bodies get 413")
    max_tokens_limit: int = Field(default=4096, gt=0, description="largest max_tokens a request may ask for")
    default_max_tokens: int = Field(default=512, gt=0, description="max_tokens when a request gives none")
    max_n: int = Field(default=8, gt=0, description="largest n (choices per prompt)")
    max_prompts: int = Field(default=32, gt=0, description="largest number of prompts in one /v1/completions call")
    streamed_paths: tuple[str, ...] = Field(default=(), description="POST paths whose bodies reach the route unbuffered")
    max_streamed_bytes: int = Field(default=512 * 1024 * 1024, gt=0, description="size limit on those paths")


def owner_for_key(key: str) -> str:
    # A stable, non-secret name for a key given without one: safe to log and to store as an owner.
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:8]


ADMIN_OWNER = "admin"


def _read_keys_file(keys_file: str | Path) -> list[tuple[str, str, bool]]:
    """(key, owner, is_admin) per line of `KEY [OWNER [admin]]`."""
    path = Path(keys_file)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read API keys file: {e.strerror or e}") from e
    out: list[tuple[str, str, bool]] = []
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 3:
            raise ConfigError(f"{path}:{lineno}: expected 'KEY', 'KEY OWNER' or 'KEY OWNER admin', "
                              f"got {len(parts)} fields")
        if len(parts) == 3 and parts[2] != "admin":
            raise ConfigError(f"{path}:{lineno}: the third field may only be 'admin', got {parts[2]!r}")
        out.append((parts[0], parts[1] if len(parts) > 1 else owner_for_key(parts[0]), len(parts) == 3))
    if not out:
        raise ConfigError(f"{path}: the API keys file holds no keys")
    return out


def load_api_keys(keys: list[str] | tuple[str, ...] = (), keys_file: str | Path | None = None,
                  admin_keys: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """Collect keys from `--api-key` values, a keys file and `--admin-key` values (owner "admin").

    The file holds one key per line, optionally followed by whitespace and the owner's name, and optionally
    by `admin` (that key may read the server's details on /health); blank lines and lines starting with #
    are skipped.
    """
    out = {k: owner_for_key(k) for k in keys if k}
    if keys_file is not None:
        out.update({key: owner for key, owner, _ in _read_keys_file(keys_file)})
    out.update({k: ADMIN_OWNER for k in admin_keys if k})
    return out


def load_admin_keys(keys_file: str | Path | None = None, admin_keys: list[str] | tuple[str, ...] = ()) -> frozenset[str]:
    """The admin keys: `--admin-key` values and keys file lines marked `admin`."""
    marked = {key for key, _, admin in _read_keys_file(keys_file) if admin} if keys_file is not None else set()
    return frozenset(marked | {k for k in admin_keys if k})
