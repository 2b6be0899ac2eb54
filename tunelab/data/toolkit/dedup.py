"""Duplicate removal: exact duplicates (hash of the normalised text) and near-duplicates (MinHash LSH with
`datasketch`), over the whole conversation or chosen roles. Keeps the first row of every cluster, writes every
other member to the rejects file with the row it duplicates, and reports the clusters.

Two LSH indexes:
  bands  (default) MinHash signatures from `datasketch`, LSH bands (b, r) from datasketch's optimiser, and the
         band buckets found by sorting one int64 column per band: ~100 bytes a row, so a million rows fit
         well under 4 GiB.
  lsh    datasketch's `MinHashLSH` queried row by row; with `redis_url` it uses datasketch's Redis storage, a
         persistent index shared by processes and runs (rows already indexed under `redis_basename` from an
         earlier file count as originals).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.data.toolkit.io import (
    JsonlWriter,
    RejectWriter,
    StepReport,
    Workspace,
    column,
    default_rejects,
    iter_batches,
    load_rows,
    map_rows,
    normalise,
    parse_raw,
    progress,
    raw_or_text,
    row_messages,
    row_text,
)
from tunelab.errors import TunelabError


class DedupConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    exact: bool = True
    near: bool = True
    threshold: float = Field(default=0.8, gt=0, le=1)
    """Estimated Jaccard similarity at or above which two rows are near-duplicates."""
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle_size: int = Field(default=3, ge=1, le=32)
    """Words per shingle (texts shorter than this are one shingle)."""
    roles: list[str] | None = None
    """Compare only these roles' turns (e.g. [user]); None = the whole conversation."""
    index: Literal["bands", "lsh"] = "bands"
    redis_url: str | None = None
    """redis://host:port/db for datasketch's persistent Redis LSH storage (implies index=lsh)."""
    redis_basename: str = "tunelab-dedup"
    verify: bool = True
    """Check every LSH candidate's estimated Jaccard against the threshold (drops LSH false positives)."""
    seed: int = 1
    num_proc: int | None = None

    @model_validator(mode="after")
    def _bands(self) -> DedupConfig:
        if self.index == "lsh" or self.redis_url:  # datasketch's MinHashLSH wants >= 2 bands; ours copes with 1
            check_lsh(self.threshold, self.num_perm)
        return self


_PERMS: dict[tuple[int, int], Any] = {}


def check_lsh(threshold: float, num_perm: int) -> None:
    """LSH needs at least two bands; a very high threshold with few permutations has one."""
    if lsh_params(threshold, num_perm)[0] < 2:
        raise ValueError(f"threshold {threshold} is too high for num_perm {num_perm} (LSH needs >= 2 bands); "
                         "raise num_perm or lower the threshold")


def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimising false positives + negatives, as datasketch chooses them."""
    from datasketch.lsh import _optimal_param

    b, r = _optimal_param(threshold, num_perm, 0.5, 0.5)
    return int(b), int(r)


def shingles(text: str, size: int, normalised: bool = False) -> list[bytes]:
    words = (text if normalised else normalise(text)).split()
    if len(words) <= size:
        return [" ".join(words).encode()]
    return [" ".join(g).encode() for g in zip(*(words[i:] for i in range(size)), strict=False)]


def minhash(text: str, num_perm: int, shingle_size: int, seed: int = 1, normalised: bool = False) -> Any:
    """A datasketch MinHash of the text's word shingles (permutations shared: building them costs 100x;
    xxh32 as the shingle hash: a C call, several times cheaper than the default SHA-1 wrapper)."""
    from datasketch import MinHash

    key = (num_perm, seed)
    if key not in _PERMS:
        _PERMS[key] = MinHash(num_perm=num_perm, seed=seed).permutations
    m = MinHash(num_perm=num_perm, seed=seed, permutations=_PERMS[key], scheme="affine32",
                hashfunc=xxhash.xxh32_intdigest)
    m.update_batch(shingles(text, shingle_size, normalised))
    return m


def _signed(x: int) -> int:
    # Arrow and numpy columns are int64; xxh64 gives an unsigned 64-bit value.
    return x - (1 << 64) if x >= (1 << 63) else x


def exact_hash(text: str, normalised: bool = False) -> int:
    return _signed(xxhash.xxh64_intdigest((text if normalised else normalise(text)).encode()))


def band_hashes(hashvalues: np.ndarray, b: int, r: int) -> list[int]:
    return [_signed(xxhash.xxh64_intdigest(hashvalues[i * r : (i + 1) * r].tobytes())) for i in range(b)]


def _signature_batch(batch: dict[str, list[Any]], cfg: dict[str, Any], b: int, r: int) -> dict[str, list[Any]]:
    ok, ex, mh, bands = [], [], [], []
    for raw in batch["_raw"]:
        obj, fmt = parse_raw(raw)
        if obj is None or fmt is None:
            ok.append(False)
            ex.append(0)
            mh.append([0] * cfg["num_perm"] if cfg["near"] else [])
            bands.append([0] * b if cfg["near"] else [])
            continue
        text = normalise(row_text(row_messages(obj, fmt), cfg["roles"]))
        ok.append(True)
        ex.append(exact_hash(text, normalised=True))
        if cfg["near"]:
            hv = minhash(text, cfg["num_perm"], cfg["shingle_size"], cfg["seed"], normalised=True).hashvalues
            mh.append(hv.tolist())
            bands.append(band_hashes(hv, b, r))
        else:
            mh.append([])
            bands.append([])
    return {"_ok": ok, "_exact": ex, "_mh": mh, "_bands": bands}


def _features(base: Any) -> Any:
    import datasets

    # Declared so signatures are stored as uint32 (half the disk of inferred int64 lists).
    return datasets.Features(
        {
            **base,
            "_ok": datasets.Value("bool"),
            "_exact": datasets.Value("int64"),
            "_mh": datasets.Sequence(datasets.Value("uint32")),
            "_bands": datasets.Sequence(datasets.Value("int64")),
        }
    )


class _UnionFind:
    """Clusters over row indices; the root is always the smallest index, i.e. the first occurrence."""

    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        p = self.parent.get(x, x)
        if p == x:
            return x
        root = self.find(p)
        self.parent[x] = root
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo


def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.count_nonzero(a == b)) / len(a)


def _near_bands(ds: Any, candidates: np.ndarray, cfg: DedupConfig) -> tuple[dict[int, int], dict[int, float]]:
    """Row index -> index of the cluster's first row, for rows that are near-duplicates of an earlier row."""
    bands = column(ds, "_bands")
    uf = _UnionFind()
    pairs: list[tuple[int, int]] = []
    idx = np.flatnonzero(candidates)
    for j in range(bands.shape[1]):
        col = bands[idx, j]
        order = np.argsort(col, kind="stable")
        sorted_col = col[order]
        # A bucket is a run of equal band hashes; link every member to the bucket's first (smallest) row.
        starts = np.flatnonzero(np.r_[True, sorted_col[1:] != sorted_col[:-1]])
        lengths = np.diff(np.r_[starts, len(sorted_col)])
        for s, n in zip(starts[lengths > 1], lengths[lengths > 1], strict=True):
            members = idx[order[s : s + n]]
            first = int(members.min())
            pairs.extend((int(m), first) for m in members if m != first)
    sims: dict[int, float] = {}
    if pairs and cfg.verify:
        pairs = sorted(set(pairs))
        need = sorted({i for p in pairs for i in p})
        sig = column(ds.select(need), "_mh")
        pos = {v: k for k, v in enumerate(need)}
        kept_pairs = []
        for a, c in pairs:
            s = _jaccard(sig[pos[a]], sig[pos[c]])
            if s >= cfg.threshold:
                kept_pairs.append((a, c))
        pairs = kept_pairs
    for a, c in pairs:
        uf.union(a, c)
    roots = {i: uf.find(i) for i in uf.parent}
    out = {i: r for i, r in roots.items() if r != i}
    if out and cfg.verify:
        need = sorted(set(out) | set(out.values()))
        sig = column(ds.select(need), "_mh")
        pos = {v: k for k, v in enumerate(need)}
        sims = {i: round(_jaccard(sig[pos[i]], sig[pos[r]]), 4) for i, r in out.items()}
    return out, sims


def _near_lsh(
    ds: Any, candidates: np.ndarray, cfg: DedupConfig, source: str
) -> tuple[dict[int, int | str], dict[int, float]]:
    """Sequential query-then-insert into datasketch's MinHashLSH (in memory, or persistent in Redis)."""
    from datasketch import LeanMinHash, MinHashLSH

    storage = None
    if cfg.redis_url:
        try:
            import redis  # noqa: F401
        except ImportError as e:  # pragma: no cover
            raise TunelabError("dedup with redis_url needs the 'redis' package: pip install redis", 2) from e
        from urllib.parse import urlparse

        u = urlparse(cfg.redis_url)
        params: dict[str, Any] = {"host": u.hostname or "localhost", "port": u.port or 6379}
        if u.path.strip("/"):
            params["db"] = int(u.path.strip("/"))
        if u.password:
            params["password"] = u.password
        storage = {"type": "redis", "basename": cfg.redis_basename.encode(), "redis": params}
    try:
        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm, storage_config=storage)
    except Exception as e:
        raise TunelabError(f"cannot open the LSH index ({type(e).__name__}): {e}", 2) from e
    out: dict[int, int | str] = {}
    sims: dict[int, float] = {}
    sig_of: dict[str, np.ndarray] = {}
    keep_sigs = cfg.verify and storage is None
    i = 0
    with progress() as bar:
        task = bar.add_task("near-duplicates (LSH)", total=len(ds))
        for batch in iter_batches(ds, ["_line", "_mh"], 5000):
            for line, hv in zip(batch["_line"], batch["_mh"], strict=True):
                if candidates[i]:
                    sig = np.asarray(hv, dtype=np.uint32)
                    m = LeanMinHash(seed=cfg.seed, hashvalues=sig, scheme="affine32")
                    hits = lsh.query(m)
                    if hits:
                        best: tuple[float, str] = max(
                            (_jaccard(sig, sig_of[h]) if h in sig_of else 1.0, h) for h in hits
                        )
                        if not keep_sigs or best[0] >= cfg.threshold:
                            out[i] = best[1]
                            sims[i] = round(best[0], 4) if keep_sigs else float("nan")
                    if i not in out:
                        key = f"{source}:{line}"
                        lsh.insert(key, m, check_duplication=False)
                        if keep_sigs:
                            sig_of[key] = sig
                i += 1
            bar.advance(task, len(batch["_line"]))
    return out, sims


def dedup(
    input: str | Path,
    output: str | Path,
    config: DedupConfig | None = None,
    rejects: str | Path | None = None,
) -> StepReport:
    """Remove exact and near-duplicate rows from `input`, writing kept rows to `output` (JSONL, unchanged
    bytes) and every dropped row to `rejects` with its reason and the line it duplicates."""
    cfg = config or DedupConfig()
    if cfg.redis_url and cfg.index != "lsh":
        cfg = cfg.model_copy(update={"index": "lsh"})
    t0 = time.perf_counter()
    rejects = rejects or default_rejects(output)
    rep = StepReport("dedup", str(input), str(output), str(rejects))
    b, r = lsh_params(cfg.threshold, cfg.num_perm)
    with Workspace() as ws:
        ds = load_rows(input, ws)
        rep.rows_in = len(ds)
        ds = map_rows(ds, _signature_batch, f"hashing {len(ds):,} rows", cfg.num_proc,
                      {"cfg": cfg.model_dump(), "b": b, "r": r}, "sig", features=_features(ds.features))
        ok = column(ds, "_ok").astype(bool)
        ex = column(ds, "_exact").astype(np.int64)
        lines = column(ds, "_line").astype(np.int64)
        exact_of: dict[int, int] = {}
        if cfg.exact:
            okidx = np.flatnonzero(ok)
            _, first_pos = np.unique(ex[okidx], return_index=True)
            is_first = np.zeros(len(ds), dtype=bool)
            is_first[okidx[first_pos]] = True
            # every non-first row points at the first row with the same hash
            first_of_hash = {int(ex[k]): int(k) for k in okidx[first_pos]}
            for k in np.flatnonzero(ok & ~is_first):
                exact_of[int(k)] = first_of_hash[int(ex[k])]
        near_of: dict[int, Any] = {}
        sims: dict[int, float] = {}
        if cfg.near:
            cand = ok.copy()
            for dup in exact_of:
                cand[dup] = False
            if cfg.index == "bands":
                n_of, sims = _near_bands(ds, cand, cfg)
                near_of = dict(n_of)
            else:
                near_of, sims = _near_lsh(ds, cand, cfg, Path(str(input)).name)
        rej = RejectWriter(rejects, "dedup")
        out = JsonlWriter(output)
        clusters: dict[Any, list[int]] = {}
        with progress() as bar:
            task = bar.add_task("writing", total=len(ds))
            i = 0
            for batch in iter_batches(ds, ["_line", "_raw"]):
                for line, raw in zip(batch["_line"], batch["_raw"], strict=True):
                    if not ok[i]:
                        rej.write(line, parse_raw(raw)[1] or "unparseable", raw_or_text(raw))
                    elif i in exact_of:
                        first = int(lines[exact_of[i]])
                        rej.write(line, "exact_duplicate", raw_or_text(raw), duplicate_of=first)
                        clusters.setdefault(first, []).append(line)
                    elif i in near_of:
                        tgt = near_of[i]
                        of: Any = int(lines[tgt]) if isinstance(tgt, int) else tgt
                        sim = sims.get(i)
                        extra = {"similarity": sim} if sim is not None and sim == sim else {}
                        rej.write(line, "near_duplicate", raw_or_text(raw), duplicate_of=of, **extra)
                        clusters.setdefault(of, []).append(line)
                    else:
                        out.write_raw(raw)
                    i += 1
                bar.advance(task, len(batch["_line"]))
        out.close()
        rej.close()
    rep.rows_out = out.count
    rep.rows_rejected = rej.total
    rep.reasons = dict(rej.counts)
    largest = sorted(clusters.items(), key=lambda kv: (-len(kv[1]), str(kv[0])))
    rep.details = {
        "clusters": len(clusters),
        "largest_clusters": [{"kept": k, "dropped": v[:20], "size": len(v) + 1} for k, v in largest[:20]],
        "lsh": {"index": cfg.index, "bands": b, "rows_per_band": r, "num_perm": cfg.num_perm,
                "threshold": cfg.threshold, "shingle_size": cfg.shingle_size},
        "duplicate_rate": round((len(exact_of) + len(near_of)) / max(1, rep.rows_in), 6),
    }
    rep.seconds = round(time.perf_counter() - t0, 3)
    rep.check()
    return rep
