"""Server settings: API keys and request limits. Frozen and typed; built by the CLI or by tests."""

from __future__ import annotations

import hashlib
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from tunelab.errors import ConfigError


class ServerSettings(BaseModel):
    """`api_keys` maps each accepted bearer key to its owner's name; empty means no authentication."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    api_keys: dict[str, str] = Field(default_factory=dict)
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


def load_api_keys(keys: list[str] | tuple[str, ...] = (), keys_file: str | Path | None = None) -> dict[str, str]:
    """Collect keys from `--api-key` values and a keys file.

    The file holds one key per line, optionally followed by whitespace and the owner's name; blank lines
    and lines starting with # are skipped.
    """
    out = {k: owner_for_key(k) for k in keys if k}
    if keys_file is None:
        return out
    path = Path(keys_file)
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read API keys file: {e.strerror or e}") from e
    for lineno, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ConfigError(f"{path}:{lineno}: expected 'KEY' or 'KEY OWNER', got {len(parts)} fields")
        out[parts[0]] = parts[1] if len(parts) == 2 else owner_for_key(parts[0])
    if not out:
        raise ConfigError(f"{path}: the API keys file holds no keys")
    return out
