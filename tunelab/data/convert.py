"""Convert any supported format to OpenAI `messages` JSONL, and split data into train/validation/test.

Splits are seeded and group exact duplicates together, so no example appears in two splits.
"""

from __future__ import annotations

import random
from pathlib import Path

from tunelab.data.readers import read_records, write_jsonl
from tunelab.data.records import Record
from tunelab.errors import TunelabError


def convert_file(src: str | Path, dst: str | Path) -> int:
    """Write every record of `src` as OpenAI JSONL (preference rows keep prompt/chosen/rejected)."""
    recs = read_records(src)
    write_jsonl(dst, [r.to_json() for r in recs])
    return len(recs)


def split_records(
    records: list[Record], fractions: tuple[float, ...] = (0.9, 0.05, 0.05), seed: int = 42
) -> list[list[Record]]:
    if any(f < 0 for f in fractions) or abs(sum(fractions) - 1.0) > 1e-6:
        raise TunelabError(f"split fractions must be non-negative and sum to 1, got {fractions}", 2)
    groups: dict[str, list[Record]] = {}
    for r in records:
        groups.setdefault(r.key(), []).append(r)
    keys = sorted(groups)  # sorted first so the result does not depend on input order
    random.Random(seed).shuffle(keys)
    n = len(keys)
    bounds, acc = [], 0.0
    for f in fractions[:-1]:
        acc += f
        bounds.append(round(acc * n))
    bounds.append(n)
    out: list[list[Record]] = []
    start = 0
    for b in bounds:
        out.append([r for k in keys[start:b] for r in groups[k]])
        start = b
    return out


def split_file(
    src: str | Path,
    out_dir: str | Path,
    fractions: tuple[float, ...] = (0.9, 0.05, 0.05),
    seed: int = 42,
    names: tuple[str, ...] = ("train", "validation", "test"),
) -> dict[str, int]:
    recs = read_records(src)
    parts = split_records(recs, fractions, seed)
    out = Path(out_dir)
    counts = {}
    for name, part in zip(names, parts, strict=True):
        write_jsonl(out / f"{name}.jsonl", [r.to_json() for r in part])
        counts[name] = len(part)
    return counts
