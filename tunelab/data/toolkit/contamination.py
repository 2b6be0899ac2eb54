"""Contamination: evaluation examples that leak into training data, found by word n-gram overlap and by
MinHash near-duplicate search (datasketch `MinHashLSH` over the evaluation set), plus a flag when training
rows were made by the same synthetic generator as the evaluation set (`metadata.generator.model`).

`check_overlap(train_records, eval_records)` works on in-memory records (what `tunelab train` calls to warn
about validation/test overlap); `contamination(train_file, eval_file)` streams a training file of any size
through `datasets` and can write a cleaned copy with every leaked row in the rejects file.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash
from pydantic import BaseModel, ConfigDict, Field, model_validator

from tunelab.data.records import Conversation, Preference, Record
from tunelab.data.toolkit.dedup import check_lsh, minhash
from tunelab.data.toolkit.io import (
    JsonlWriter,
    RejectWriter,
    StepReport,
    Workspace,
    default_rejects,
    iter_batches,
    load_rows,
    map_rows,
    normalise,
    parse_raw,
    raw_or_text,
    row_messages,
    row_text,
)


class ContaminationConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    ngram: int = Field(default=8, ge=1, le=64)
    """Words per n-gram (GPT-3 used 13 on documents; chat turns are short, so 8)."""
    min_overlap: float = Field(default=0.5, gt=0, le=1)
    """A train row leaks an eval example when it contains at least this fraction of the example's n-grams."""
    threshold: float = Field(default=0.8, gt=0, le=1)
    """MinHash near-duplicate Jaccard threshold."""
    num_perm: int = Field(default=128, ge=16, le=1024)
    shingle_size: int = Field(default=3, ge=1)
    roles: list[str] | None = None
    num_proc: int | None = None

    @model_validator(mode="after")
    def _bands(self) -> ContaminationConfig:
        check_lsh(self.threshold, self.num_perm)
        return self


@dataclass
class Leak:
    eval_index: int
    eval_line: int | None
    train_index: int
    train_line: int | None
    method: str  # "ngram" | "minhash" | "exact"
    score: float


@dataclass
class ContaminationReport:
    train_rows: int
    eval_rows: int
    leaks: list[Leak] = field(default_factory=list)
    same_generator: list[str] = field(default_factory=list)

    @property
    def leaked_eval(self) -> list[int]:
        return sorted({lk.eval_index for lk in self.leaks})

    @property
    def contaminated_train(self) -> list[int]:
        return sorted({lk.train_index for lk in self.leaks})

    def summary(self) -> str:
        parts = []
        if self.leaks:
            parts.append(
                f"{len(self.leaked_eval)} of {self.eval_rows} evaluation examples overlap the training data "
                f"({len(self.contaminated_train)} training rows)"
            )
        if self.same_generator:
            parts.append(f"training and evaluation data come from the same generator: {', '.join(self.same_generator)}")
        return "; ".join(parts) or "no overlap found"

    def to_json(self) -> dict[str, Any]:
        return {
            "train_rows": self.train_rows,
            "eval_rows": self.eval_rows,
            "leaked_eval": len(self.leaked_eval),
            "contaminated_train": len(self.contaminated_train),
            "same_generator": self.same_generator,
            "leaks": [lk.__dict__ for lk in self.leaks],
            "summary": self.summary(),
        }


def ngrams(text: str, n: int) -> set[int]:
    words = normalise(text).split()
    if not words:
        return set()
    if len(words) <= n:
        return {xxhash.xxh64_intdigest(" ".join(words).encode())}
    return {xxhash.xxh64_intdigest(" ".join(words[i : i + n]).encode()) for i in range(len(words) - n + 1)}


class EvalIndex:
    """The evaluation set in memory: n-gram -> eval examples, and a MinHash LSH over whole texts."""

    def __init__(self, texts: list[str], cfg: ContaminationConfig) -> None:
        from datasketch import MinHashLSH

        self.cfg = cfg
        self.sizes: list[int] = []
        self.postings: dict[int, list[int]] = {}
        self.exact: dict[str, int] = {}
        self.lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        self.sigs = []
        for i, t in enumerate(texts):
            grams = ngrams(t, cfg.ngram)
            self.sizes.append(len(grams))
            for g in grams:
                self.postings.setdefault(g, []).append(i)
            self.exact.setdefault(normalise(t), i)
            m = minhash(t, cfg.num_perm, cfg.shingle_size)
            self.sigs.append(m)
            if normalise(t):
                self.lsh.insert(i, m, check_duplication=False)

    def match(self, text: str) -> list[tuple[int, str, float]]:
        """(eval index, method, score) for every eval example this text leaks."""
        hits: dict[int, tuple[str, float]] = {}
        norm = normalise(text)
        if not norm:
            return []
        if norm in self.exact:
            hits[self.exact[norm]] = ("exact", 1.0)
        shared: dict[int, int] = {}
        for g in ngrams(text, self.cfg.ngram):
            for e in self.postings.get(g, ()):
                shared[e] = shared.get(e, 0) + 1
        for e, k in shared.items():
            frac = k / max(1, self.sizes[e])
            if frac >= self.cfg.min_overlap and e not in hits:
                hits[e] = ("ngram", round(frac, 4))
        m = minhash(text, self.cfg.num_perm, self.cfg.shingle_size)
        for e in self.lsh.query(m):
            j = m.jaccard(self.sigs[e])
            if j >= self.cfg.threshold and e not in hits:
                hits[e] = ("minhash", round(j, 4))
        return [(e, meth, s) for e, (meth, s) in sorted(hits.items())]


def _record_text(r: Record, roles: list[str] | None) -> str:
    msgs = r.messages if isinstance(r, Conversation) else (*r.prompt, *r.chosen) if isinstance(r, Preference) else ()
    return row_text([(m.role, m.content) for m in msgs], roles, with_roles=False)


def _generators(rows: Sequence[Any]) -> set[str]:
    out = set()
    for obj in rows:
        gen = obj.get("metadata", {}).get("generator") if isinstance(obj, dict) and isinstance(obj.get("metadata"), dict) else None
        if isinstance(gen, dict) and gen.get("model"):
            out.add(str(gen["model"]))
    return out


def check_overlap(
    train_records: Sequence[Record],
    eval_records: Sequence[Record],
    config: ContaminationConfig | None = None,
) -> ContaminationReport:
    """Leaks of `eval_records` into `train_records` (in memory). For `tunelab train`'s validation/test warning."""
    cfg = config or ContaminationConfig()
    index = EvalIndex([_record_text(r, cfg.roles) for r in eval_records], cfg)
    rep = ContaminationReport(len(train_records), len(eval_records))
    for ti, r in enumerate(train_records):
        for e, meth, score in index.match(_record_text(r, cfg.roles)):
            src_e = eval_records[e].source
            rep.leaks.append(Leak(e, src_e.line if src_e else None, ti, r.source.line if r.source else None, meth, score))
    return rep


def overlap_warning(
    train_records: Sequence[Record], eval_records: Sequence[Record], split: str = "validation",
    config: ContaminationConfig | None = None,
) -> str | None:
    """A one-line warning when `eval_records` leak into `train_records`, else None (for `tunelab train`)."""
    rep = check_overlap(train_records, eval_records, config)
    if not rep.leaks:
        return None
    lines = sorted({lk.eval_line for lk in rep.leaks if lk.eval_line is not None})
    shown = ", ".join(str(x) for x in lines[:10])
    more = f" (+{len(lines) - 10} more)" if len(lines) > 10 else ""
    return (f"{len(rep.leaked_eval)} of {len(eval_records)} {split} examples also appear (near-)verbatim in the "
            f"training data (lines {shown}{more}): {split} metrics will be optimistic; "
            "remove them with `tunelab data contamination TRAIN EVAL -o CLEAN`")


def _match_batch(batch: dict[str, list[Any]], index: EvalIndex, roles: list[str] | None) -> dict[str, list[Any]]:
    out, gens, ok = [], [], []
    for raw in batch["_raw"]:
        obj, fmt = parse_raw(raw)
        if obj is None or fmt is None:
            out.append("")
            gens.append("")
            ok.append(False)
            continue
        ok.append(True)
        hits = index.match(row_text(row_messages(obj, fmt), roles, with_roles=False))
        out.append(json.dumps(hits) if hits else "")
        g = _generators([obj])
        gens.append(next(iter(g)) if g else "")
    return {"_leaks": out, "_gen": gens, "_ok": ok}


def contamination(
    train: str | Path,
    eval_path: str | Path,
    config: ContaminationConfig | None = None,
    output: str | Path | None = None,
    rejects: str | Path | None = None,
) -> tuple[ContaminationReport, StepReport | None]:
    """Find evaluation examples leaked into a training file. With `output`, also write the training data
    minus every contaminated row (those go to `rejects` with the eval line they leak)."""
    cfg = config or ContaminationConfig()
    t0 = time.perf_counter()
    if output is not None:
        rejects = rejects or default_rejects(output)
    with Workspace() as ws:
        eds = load_rows(eval_path, ws)
        eval_lines: list[int] = []
        eval_texts: list[str] = []
        eval_objs: list[Any] = []
        for b in iter_batches(eds, ["_line", "_raw"]):
            for line, raw in zip(b["_line"], b["_raw"], strict=True):
                obj, fmt = parse_raw(raw)
                if obj is None or fmt is None:
                    continue
                eval_lines.append(line)
                eval_texts.append(row_text(row_messages(obj, fmt), cfg.roles, with_roles=False))
                eval_objs.append(obj)
        index = EvalIndex(eval_texts, cfg)
        eval_gens = _generators(eval_objs)
        ds = load_rows(train, ws)
        ds = map_rows(ds, _match_batch, f"checking {len(ds):,} training rows against {len(eval_texts):,}",
                      cfg.num_proc, {"index": index, "roles": cfg.roles}, "leak")
        report = ContaminationReport(len(ds), len(eval_texts))
        train_gens: set[str] = set()
        step: StepReport | None = None
        out = JsonlWriter(output) if output else None
        rej = RejectWriter(rejects, "contamination") if output else None
        i = 0
        for b in iter_batches(ds, ["_line", "_raw", "_leaks", "_gen", "_ok"]):
            for line, raw, leaks, gen, ok in zip(b["_line"], b["_raw"], b["_leaks"], b["_gen"], b["_ok"], strict=True):
                if gen:
                    train_gens.add(gen)
                hits = json.loads(leaks) if leaks else []
                for e, meth, score in hits:
                    report.leaks.append(Leak(e, eval_lines[e], i, line, meth, score))
                if out is not None and rej is not None:
                    if not ok:
                        rej.write(line, parse_raw(raw)[1] or "unparseable", raw_or_text(raw))
                    elif hits:
                        rej.write(line, "eval_leak", raw_or_text(raw),
                                  eval_lines=[eval_lines[e] for e, _, _ in hits], methods=[m for _, m, _ in hits])
                    else:
                        out.write_raw(raw)
                i += 1
        report.same_generator = sorted(train_gens & eval_gens)
        if out is not None and rej is not None:
            out.close()
            rej.close()
            step = StepReport("contamination", str(train), str(output), str(rejects), rows_in=len(ds),
                              rows_out=out.count, rows_rejected=rej.total, reasons=dict(rej.counts),
                              details={"summary": report.summary()}, seconds=round(time.perf_counter() - t0, 3))
            step.check()
    return report, step
