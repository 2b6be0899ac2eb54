"""Shared plumbing for the data toolkit: rows in through `datasets` (Arrow on disk, bounded memory), rows out
as JSONL, a rejects/audit file for every dropped or changed row, the per-step report, text views of a row in
any supported format, and the progress bar.

A toolkit dataset has two columns: `_line` (1-based line in the input file) and `_raw` (the line's text, kept
byte-for-byte so a row a step keeps is written back unchanged). Steps add their own `_`-prefixed columns with
`Dataset.map(num_proc=...)` and decide in the main process which rows to keep. Nothing here knows about any
one step.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from tunelab.data.readers import SHAREGPT_ROLES, detect_format, iter_lines
from tunelab.errors import TunelabError

console = Console(stderr=True)
TEXT_SUFFIXES = {".jsonl", ".json", ".ndjson", ".txt"}
TABLE_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}
BATCH = 2000


def auto_num_proc(rows: int, requested: int | None) -> int:
    """Worker processes for `Dataset.map`: forking costs ~1 s, so small inputs stay in-process."""
    if requested is not None:
        return max(1, requested)
    return 1 if rows < 20_000 else max(1, min(os.cpu_count() or 1, 8))


# ---------------------------------------------------------------------------------------------- reading


def _jsonl_rows(path: str) -> Iterator[dict[str, Any]]:
    for lineno, text, raw in iter_lines(Path(path)):
        if text is None:  # kept so the step can reject it by line: nothing disappears silently
            yield {"_line": lineno, "_raw": raw.decode("utf-8", errors="replace").rstrip("\r\n")}
        elif text.strip():
            yield {"_line": lineno, "_raw": text}


def _table_rows(path: str, kind: str) -> Iterator[dict[str, Any]]:
    import datasets

    ds = datasets.load_dataset(kind, data_files=path, split="train")
    for i, row in enumerate(ds):
        yield {"_line": i + 1, "_raw": json.dumps(row, ensure_ascii=False, default=str)}


class Workspace:
    """A private Arrow cache folder for one step, removed afterwards (never the user's HF cache, so a changed
    input file can never be served from a stale cache)."""

    def __init__(self, parent: str | Path | None = None) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="tunelab-data-", dir=parent))

    def __enter__(self) -> Workspace:
        return self

    def __exit__(self, *exc: object) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def load_rows(path: str | Path, ws: Workspace) -> Any:
    """Read any supported file into an Arrow-backed `datasets.Dataset` with `_line` and `_raw` columns."""
    import datasets

    p = Path(path)
    if not p.exists():
        raise TunelabError(f"{p}: file not found")
    if p.is_dir():
        raise TunelabError(f"{p}: is a directory, expected a data file")
    features = datasets.Features({"_line": datasets.Value("int64"), "_raw": datasets.Value("string")})
    kind = TABLE_SUFFIXES.get(p.suffix.lower())
    gen: Callable[..., Iterator[dict[str, Any]]] = _jsonl_rows if kind is None else _table_rows
    kwargs: dict[str, Any] = {"path": str(p)} if kind is None else {"path": str(p), "kind": kind}
    datasets.disable_progress_bars()
    try:
        ds = datasets.Dataset.from_generator(
            gen, features=features, cache_dir=str(ws.dir / "cache"), gen_kwargs=kwargs,
            fingerprint=f"load-{time.time_ns()}",
        )
    except (ValueError, datasets.exceptions.DatasetGenerationError) as e:
        # datasets refuses a generator that yields nothing ("corresponds to no data")
        if "no data" in str(e) or p.stat().st_size == 0:
            raise TunelabError(f"{p}: file is empty: no examples found") from None
        raise TunelabError(f"{p}: cannot read ({type(e).__name__}): {e}") from e
    return ds


def column(ds: Any, name: str) -> Any:
    """One column as a numpy array straight from Arrow (2-D for fixed-length list columns). Much faster than
    `ds[name]`, which builds Python objects row by row."""
    import numpy as np
    import pyarrow as pa

    col = ds.select_columns([name]).with_format("arrow")[:].column(name).combine_chunks()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        n = len(col)
        flat = col.flatten().to_numpy(zero_copy_only=False)
        return flat.reshape(n, -1) if n else np.zeros((0, 0), dtype=flat.dtype)
    return col.to_numpy(zero_copy_only=False)


def iter_batches(ds: Any, columns: list[str], batch_size: int = 10_000) -> Iterator[dict[str, list[Any]]]:
    yield from ds.select_columns(columns).iter(batch_size=batch_size)


# ---------------------------------------------------------------------------------------- views of rows


def parse_raw(raw: str | None) -> tuple[dict[str, Any] | None, str | None]:
    """(object, format) or (None, reason) when the line is not a usable example."""
    if raw is None:
        return None, "empty"
    try:
        obj = json.loads(raw)
    except json.JSONDecodeError:
        return None, "invalid_json"
    if not isinstance(obj, dict):
        return None, "not_an_object"
    fmt = detect_format(obj)
    if fmt is None:
        return None, "unknown_format"
    return obj, fmt


def _msgs(val: Any, default_role: str) -> list[tuple[str, str]]:
    if isinstance(val, str):
        return [(default_role, val)]
    out = []
    if isinstance(val, list):
        for m in val:
            if isinstance(m, dict) and isinstance(m.get("content"), str):
                out.append((str(m.get("role", default_role)), m["content"]))
    return out


def row_messages(obj: dict[str, Any], fmt: str) -> list[tuple[str, str]]:
    """(role, text) turns of a row in any supported format; lenient (validation is `tunelab data validate`)."""
    if fmt == "messages":
        return _msgs(obj.get("messages"), "user")
    if fmt == "sharegpt":
        out = [("system", obj["system"])] if isinstance(obj.get("system"), str) and obj["system"] else []
        for t in obj.get("conversations") or []:
            if isinstance(t, dict) and isinstance(t.get("value"), str):
                out.append((SHAREGPT_ROLES.get(str(t.get("from", "")).lower(), "user"), t["value"]))
        return out
    if fmt == "alpaca":
        out = [("system", obj["system"])] if isinstance(obj.get("system"), str) and obj["system"] else []
        user = "\n\n".join(str(obj[k]) for k in ("instruction", "input") if isinstance(obj.get(k), str) and obj[k])
        return [*out, ("user", user), ("assistant", str(obj.get("output") or ""))]
    if fmt == "preference":
        return [*_msgs(obj.get("prompt"), "user"), *_msgs(obj.get("chosen"), "assistant"),
                *_msgs(obj.get("rejected"), "assistant")]
    # prompt_completion and unpaired
    return [*_msgs(obj.get("prompt"), "user"), *_msgs(obj.get("completion"), "assistant")]


def map_texts(obj: dict[str, Any], fmt: str, fn: Callable[[str], str]) -> dict[str, Any]:
    """A copy of the row with every natural-language string passed through `fn` (structure untouched)."""

    def msgs(val: Any) -> Any:
        if isinstance(val, str):
            return fn(val)
        if isinstance(val, list):
            return [
                {**m, "content": fn(m["content"])} if isinstance(m, dict) and isinstance(m.get("content"), str) else m
                for m in val
            ]
        return val

    out = dict(obj)
    if fmt == "messages":
        out["messages"] = msgs(obj.get("messages"))
    elif fmt == "sharegpt":
        conv = obj.get("conversations")
        if isinstance(conv, list):
            out["conversations"] = [
                {**t, "value": fn(t["value"])} if isinstance(t, dict) and isinstance(t.get("value"), str) else t
                for t in conv
            ]
    elif fmt == "preference":
        for k in ("prompt", "chosen", "rejected"):
            if k in obj:
                out[k] = msgs(obj[k])
    elif fmt == "alpaca":
        for k in ("instruction", "input", "output"):
            if isinstance(obj.get(k), str):
                out[k] = fn(obj[k])
    else:
        for k in ("prompt", "completion"):
            if k in obj:
                out[k] = msgs(obj[k])
    if fmt in ("sharegpt", "alpaca") and isinstance(obj.get("system"), str):
        out["system"] = fn(obj["system"])
    return out


def row_text(turns: list[tuple[str, str]], roles: list[str] | None = None, with_roles: bool = True) -> str:
    sel = [(r, t) for r, t in turns if roles is None or r in roles]
    if with_roles:
        return "\n".join(f"{r}: {t}" for r, t in sel)
    return "\n".join(t for _, t in sel)


_PUNCT = re.compile(r"[^\w\s]|_")


def normalise(text: str) -> str:
    """What "the same text" means for exact duplicates: Unicode-compatible, case-folded, punctuation and
    whitespace runs ignored."""
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(_PUNCT.sub(" ", text).split())


# ------------------------------------------------------------------------------------ rejects and reports


class RejectWriter:
    """Streams one JSON line per dropped or changed row: {"line", "step", "reason", ..., "row"}."""

    def __init__(self, path: str | Path | None, step: str) -> None:
        self.path = Path(path) if path else None
        self.step = step
        self.counts: Counter[str] = Counter()
        self.audited: Counter[str] = Counter()
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._tmp = self.path.with_name(f".{self.path.name}.tmp")
            self._f = self._tmp.open("w", encoding="utf-8")

    def write(self, line: int, reason: str, row: Any, **detail: Any) -> None:
        """A dropped row."""
        self.counts[reason] += 1
        self._emit(line, reason, row, detail)

    def audit(self, line: int, reason: str, row: Any, **detail: Any) -> None:
        """A changed row that is kept: logged, not counted as rejected."""
        self.audited[reason] += 1
        self._emit(line, reason, row, detail)

    def _emit(self, line: int, reason: str, row: Any, detail: dict[str, Any]) -> None:
        if self._f is not None:
            rec = {"line": line, "step": self.step, "reason": reason, **detail, "row": row}
            self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def close(self) -> None:
        if self._f is not None and self.path is not None:
            self._f.close()
            self._f = None
            self._tmp.replace(self.path)


class JsonlWriter:
    """Atomic streaming JSONL writer (temp file renamed into place at the end)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self.path.with_name(f".{self.path.name}.tmp")
        self._f = self._tmp.open("w", encoding="utf-8")
        self.count = 0

    def write_raw(self, line: str) -> None:
        self._f.write(line + "\n")
        self.count += 1

    def write(self, obj: Any) -> None:
        self.write_raw(json.dumps(obj, ensure_ascii=False))

    def close(self) -> None:
        self._f.close()
        self._tmp.replace(self.path)


def raw_or_text(raw: str) -> Any:
    """A reject keeps the row as JSON when it parses, else as the original text."""
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, TypeError):
        return raw


@dataclass
class StepReport:
    """What one step did. Invariant: rows_in == rows_out + rows_rejected (changed rows are audited, not lost)."""

    step: str
    input: str
    output: str | None
    rejects: str | None
    rows_in: int = 0
    rows_out: int = 0
    rows_rejected: int = 0
    rows_changed: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def check(self) -> None:
        if self.rows_in != self.rows_out + self.rows_rejected:
            raise AssertionError(
                f"{self.step}: {self.rows_in} rows in != {self.rows_out} out + {self.rows_rejected} rejected"
            )

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def write(self, path: str | Path) -> None:
        p = Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(self.to_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def default_rejects(output: str | Path) -> Path:
    p = Path(output)
    stem = p.name[: -len(p.suffix)] if p.suffix else p.name
    return p.with_name(f"{stem}.rejects.jsonl")


def map_rows(ds: Any, fn: Any, what: str, requested_procs: int | None, fn_kwargs: dict[str, Any],
             tag: str, features: Any = None) -> Any:
    """`fn` over `ds` in batches of 1,000 (worker processes for large inputs, see `auto_num_proc`), with a
    spinner saying `what`. A fresh fingerprint each call: the cache must never hand back another run's columns."""
    nproc = auto_num_proc(len(ds), requested_procs)
    with progress() as bar:
        bar.add_task(f"{what} (num_proc={nproc})", total=None)
        return ds.map(fn, batched=True, batch_size=1000, num_proc=nproc if nproc > 1 else None, fn_kwargs=fn_kwargs,
                      features=features, new_fingerprint=f"{tag}-{time.time_ns()}")


def progress() -> Progress:
    return Progress(
        SpinnerColumn(),
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    )
