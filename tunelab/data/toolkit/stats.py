"""Dataset statistics: examples, tokens, turns, role and length distributions, exact-duplicate rate, and a
PNG histogram of tokens per example (matplotlib, Agg backend: no display needed). Streams through
`datasets` like every other step; only per-row numbers are held in memory.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from tunelab.data.toolkit.dedup import exact_hash
from tunelab.data.toolkit.io import (
    Workspace,
    column,
    iter_batches,
    load_rows,
    map_rows,
    parse_raw,
    row_messages,
    row_text,
)


def _stats_batch(batch: dict[str, list[Any]], tokenizer: Any) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"_ok": [], "_fmt": [], "_turns": [], "_roles": [], "_chars": [], "_hash": []}
    texts = []
    for raw in batch["_raw"]:
        obj, fmt = parse_raw(raw)
        turns = row_messages(obj, fmt) if obj is not None and fmt is not None else []
        text = row_text(turns, with_roles=False)
        texts.append(text)
        out["_ok"].append(obj is not None)
        out["_fmt"].append(fmt if obj is not None else f"invalid:{fmt}")
        out["_turns"].append(len(turns))
        out["_roles"].append(json.dumps(Counter(r for r, _ in turns)))
        out["_chars"].append(len(text))
        out["_hash"].append(exact_hash(row_text(turns)))
    if tokenizer is not None:
        out["_tokens"] = [len(x) for x in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    else:
        out["_tokens"] = [len(t.split()) for t in texts]
    return out


def _dist(a: np.ndarray) -> dict[str, float]:
    if len(a) == 0:
        return {}
    q = np.percentile(a, [50, 90, 95, 99])
    return {"min": float(a.min()), "mean": round(float(a.mean()), 2), "p50": float(q[0]), "p90": float(q[1]),
            "p95": float(q[2]), "p99": float(q[3]), "max": float(a.max())}


def dataset_stats(
    input: str | Path,
    *,
    tokenizer: Any = None,
    histogram: str | Path | None = None,
    num_proc: int | None = None,
) -> dict[str, Any]:
    """Statistics of a data file; token counts use `tokenizer` (else whitespace words, said in the result)."""
    t0 = time.perf_counter()
    with Workspace() as ws:
        ds = load_rows(input, ws)
        ds = map_rows(ds, _stats_batch, f"reading {len(ds):,} rows", num_proc, {"tokenizer": tokenizer}, "stats")
        ok = column(ds, "_ok").astype(bool)
        turns = column(ds, "_turns")[ok]
        chars = column(ds, "_chars")[ok]
        toks = column(ds, "_tokens")[ok]
        hashes = column(ds, "_hash")[ok]
        roles: Counter[str] = Counter()
        turns_by_role: dict[str, list[int]] = {}
        formats: Counter[str] = Counter()
        for b in iter_batches(ds, ["_roles", "_fmt"]):
            for r, f in zip(b["_roles"], b["_fmt"], strict=True):
                c = json.loads(r)
                roles.update(c)
                formats[f] += 1
                for k, v in c.items():
                    turns_by_role.setdefault(k, []).append(v)
    n = int(ok.sum())
    unique = len(np.unique(hashes)) if n else 0
    result: dict[str, Any] = {
        "file": str(input),
        "rows": int(len(ok)),
        "examples": n,
        "unparseable": int((~ok).sum()),
        "formats": dict(formats),
        "token_unit": "tokens" if tokenizer is not None else "words",
        "tokens": {"total": int(toks.sum()), **_dist(toks)},
        "chars": _dist(chars),
        "turns": {"total": int(turns.sum()), **_dist(turns),
                  "histogram": {str(k): int(v) for k, v in sorted(Counter(turns.tolist()).items())}},
        "roles": dict(roles),
        "messages_per_example_by_role": {k: round(sum(v) / max(1, n), 3) for k, v in sorted(turns_by_role.items())},
        "duplicates": n - unique,
        "duplicate_rate": round((n - unique) / n, 6) if n else 0.0,
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if histogram is not None and n:
        result["histogram"] = str(write_histogram(toks, histogram, result["token_unit"]))
    return result


def write_histogram(values: np.ndarray, path: str | Path, unit: str = "tokens") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    lo, hi = int(values.min()), int(values.max())
    # integer-aligned bins, else whole-number lengths alias into spikes
    step = max(1, int(np.ceil((hi - lo + 1) / 50)))
    ax.hist(values, bins=(np.arange(lo, hi + step + 1, step) - 0.5).tolist(), color="#4472c4", edgecolor="white")
    ax.set_xlabel(f"{unit} per example")
    ax.set_ylabel("examples")
    ax.set_title(f"{len(values):,} examples, median {int(np.median(values))} {unit}")
    fig.tight_layout()
    fig.savefig(p, dpi=100)
    plt.close(fig)
    return p
