"""Quality filtering: token-length bounds, repetition ratio, language (py3langid, whose model ships inside
the PyPI package, so it works offline), and perplexity under a reference model dropping the worst fraction.

Scores are computed for every row as dataset columns (`_tokens`, `_repetition`, `_lang`, `_lang_prob`,
`_ppl`) and written into kept rows under `metadata.quality` (a key every reader accepts); each dropped row
goes to the rejects file with its reason and scores. Perplexity runs in the main process (one model), only on
rows that passed the cheap filters.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

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


class FilterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    min_tokens: int | None = Field(default=None, ge=0)
    max_tokens: int | None = Field(default=None, ge=1)
    max_repetition: float | None = Field(default=None, gt=0, le=1)
    """Drop rows whose fraction of repeated word 3-grams exceeds this (0 = all distinct, ~1 = a loop)."""
    languages: list[str] | None = None
    """ISO 639-1 codes to keep (e.g. [en]); None = no language filter."""
    lang_min_chars: int = Field(default=20, ge=0)
    """Texts shorter than this are too short to identify and are kept (language "und")."""
    ppl_drop_fraction: float = Field(default=0.0, ge=0, lt=1)
    """Drop this fraction of the remaining rows with the highest perplexity (0 = no perplexity pass)."""
    ppl_model: str | None = None
    """Reference model for perplexity; None = the base model (DEFAULT_MODEL)."""
    ppl_batch_size: int = Field(default=8, ge=1)
    ppl_max_length: int = Field(default=512, ge=8)
    tokenizer: str | None = None
    """Tokenizer for token counts; None = the perplexity model's, else the base model's."""
    keep_scores: bool = True
    num_proc: int | None = None


def repetition_ratio(text: str, n: int = 3) -> float:
    """Fraction of word n-grams that repeat an earlier n-gram in the same text."""
    words = normalise(text).split()
    if len(words) < n + 1:
        return 0.0
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return round(1.0 - len(set(grams)) / len(grams), 4)


_LANGID: Any = None


def detect_language(text: str, min_chars: int = 20) -> tuple[str, float]:
    """(ISO code, probability); ("und", 0.0) for text too short to tell."""
    global _LANGID
    if len(text.strip()) < min_chars:
        return "und", 0.0
    if _LANGID is None:
        from py3langid.langid import MODEL_FILE, LanguageIdentifier

        _LANGID = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    lang, prob = _LANGID.classify(text)
    return str(lang), round(float(prob), 4)


def _score_batch(batch: dict[str, list[Any]], tokenizer: Any, min_chars: int, want_lang: bool) -> dict[str, Any]:
    out: dict[str, list[Any]] = {"_ok": [], "_text": [], "_tokens": [], "_repetition": [], "_lang": [], "_lang_prob": []}
    texts = []
    for raw in batch["_raw"]:
        obj, fmt = parse_raw(raw)
        ok = obj is not None and fmt is not None
        text = row_text(row_messages(obj, fmt), with_roles=False) if obj is not None and fmt is not None else ""
        out["_ok"].append(ok)
        out["_text"].append(text)
        texts.append(text)
        out["_repetition"].append(repetition_ratio(text))
        lang, prob = detect_language(text, min_chars) if want_lang else ("und", 0.0)
        out["_lang"].append(lang)
        out["_lang_prob"].append(prob)
    if tokenizer is not None:
        out["_tokens"] = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    else:  # no tokenizer: whitespace words stand in for tokens
        out["_tokens"] = [len(t.split()) for t in texts]
    return out


def perplexities(texts: list[str], model: Any, tokenizer: Any, batch_size: int = 8, max_length: int = 512) -> list[float]:
    """Per-text perplexity exp(mean token NLL) under `model`, batched with right padding."""
    import torch

    model.eval()
    device = next(model.parameters()).device
    out: list[float] = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for i in range(0, len(texts), batch_size):
        chunk = texts[i : i + batch_size]
        enc = [tokenizer(t, add_special_tokens=False, truncation=True, max_length=max_length)["input_ids"] for t in chunk]
        width = max(2, max(len(e) for e in enc))
        ids = torch.full((len(enc), width), pad, dtype=torch.long)
        mask = torch.zeros((len(enc), width), dtype=torch.long)
        for j, e in enumerate(enc):
            ids[j, : len(e)] = torch.tensor(e, dtype=torch.long)
            mask[j, : len(e)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = ids[:, 1:].to(device)
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1)
        m = mask[:, 1:].to(device).float()
        mean = (nll * m).sum(1) / m.sum(1).clamp(min=1)
        for j, e in enumerate(enc):
            out.append(math.exp(min(float(mean[j]), 50.0)) if len(e) > 1 else float("inf"))
    return out


def _load_reference(name: str | None) -> tuple[Any, Any]:
    from tunelab.model.loading import DEFAULT_MODEL, load_model

    model, tok = load_model(name or DEFAULT_MODEL, dtype="fp32")
    return model, tok


def quality_filter(
    input: str | Path,
    output: str | Path,
    config: FilterConfig | None = None,
    rejects: str | Path | None = None,
    *,
    model: Any = None,
    tokenizer: Any = None,
) -> StepReport:
    """Score every row and drop the ones outside the configured bounds. `model`/`tokenizer` override the
    reference model (tests pass tiny in-process ones)."""
    cfg = config or FilterConfig()
    if cfg.min_tokens is not None and cfg.max_tokens is not None and cfg.min_tokens > cfg.max_tokens:
        raise TunelabError(f"filter: min_tokens ({cfg.min_tokens}) > max_tokens ({cfg.max_tokens})", 2)
    t0 = time.perf_counter()
    rejects = rejects or default_rejects(output)
    rep = StepReport("filter", str(input), str(output), str(rejects))
    if cfg.ppl_drop_fraction > 0 and model is None:
        model, ref_tok = _load_reference(cfg.ppl_model)
        tokenizer = tokenizer or ref_tok
    if tokenizer is None and (cfg.min_tokens is not None or cfg.max_tokens is not None) and cfg.tokenizer != "words":
        from tunelab.model.loading import DEFAULT_MODEL, load_tokenizer, resolve_model

        tokenizer = load_tokenizer(resolve_model(cfg.tokenizer or DEFAULT_MODEL))
    with Workspace() as ws:
        ds = load_rows(input, ws)
        rep.rows_in = len(ds)
        ds = map_rows(ds, _score_batch, f"scoring {len(ds):,} rows", cfg.num_proc,
                      {"tokenizer": tokenizer, "min_chars": cfg.lang_min_chars,
                       "want_lang": cfg.languages is not None or cfg.keep_scores}, "score")
        ok = column(ds, "_ok").astype(bool)
        toks = column(ds, "_tokens")
        rep_ratio = column(ds, "_repetition")
        langs = column(ds, "_lang")
        reason = np.array([""] * len(ds), dtype=object)
        reason[~ok] = "unparseable"

        def drop(mask: np.ndarray, why: str) -> None:
            reason[(reason == "") & mask] = why

        if cfg.min_tokens is not None:
            drop(toks < cfg.min_tokens, "too_short")
        if cfg.max_tokens is not None:
            drop(toks > cfg.max_tokens, "too_long")
        if cfg.max_repetition is not None:
            drop(rep_ratio > cfg.max_repetition, "repetitive")
        if cfg.languages is not None:
            allowed = {*cfg.languages, "und"}
            drop(np.array([lang not in allowed for lang in langs], dtype=bool), "language")
        ppl = np.full(len(ds), np.nan)
        if cfg.ppl_drop_fraction > 0:
            alive = np.flatnonzero(reason == "")
            texts = list(column(ds.select(alive.tolist()), "_text")) if len(alive) else []
            with progress() as bar:
                task = bar.add_task("perplexity", total=len(texts))
                vals: list[float] = []
                step = cfg.ppl_batch_size * 8
                for i in range(0, len(texts), step):
                    vals.extend(perplexities(texts[i : i + step], model, tokenizer, cfg.ppl_batch_size,
                                             cfg.ppl_max_length))
                    bar.advance(task, len(texts[i : i + step]))
            ppl[alive] = vals
            n_drop = math.ceil(cfg.ppl_drop_fraction * len(alive)) if len(alive) else 0
            if n_drop:
                # stable: ties broken by position, so the result does not depend on the sort algorithm
                worst = alive[np.argsort(-ppl[alive], kind="stable")[:n_drop]]
                mask = np.zeros(len(ds), dtype=bool)
                mask[worst] = True
                drop(mask, "perplexity")
            rep.details["ppl_threshold"] = float(np.min(ppl[worst])) if n_drop else None
        rej = RejectWriter(rejects, "filter")
        out = JsonlWriter(output)
        with progress() as bar:
            task = bar.add_task("writing", total=len(ds))
            i = 0
            for batch in iter_batches(ds, ["_line", "_raw", "_tokens", "_repetition", "_lang", "_lang_prob"]):
                for j, (line, raw) in enumerate(zip(batch["_line"], batch["_raw"], strict=True)):
                    scores = {"tokens": int(batch["_tokens"][j]), "repetition": float(batch["_repetition"][j]),
                              "lang": batch["_lang"][j], "lang_prob": float(batch["_lang_prob"][j]),
                              "perplexity": None if np.isnan(ppl[i]) else round(float(ppl[i]), 4)}
                    if reason[i]:
                        why = parse_raw(raw)[1] if reason[i] == "unparseable" else reason[i]
                        rej.write(line, str(why), raw_or_text(raw), scores=scores)
                    elif cfg.keep_scores:
                        obj = json.loads(raw)
                        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
                        obj["metadata"] = {**meta, "quality": scores}
                        out.write(obj)
                    else:
                        out.write_raw(raw)
                    i += 1
                bar.advance(task, len(batch["_line"]))
        out.close()
        rej.close()
    rep.rows_out = out.count
    rep.rows_rejected = rej.total
    rep.reasons = dict(rej.counts)
    rep.details.update({
        "tokens": {"min": int(toks.min()) if len(toks) else 0, "max": int(toks.max()) if len(toks) else 0,
                   "mean": round(float(toks.mean()), 2) if len(toks) else 0.0},
        "tokenizer": "words" if tokenizer is None else type(tokenizer).__name__,
    })
    rep.seconds = round(time.perf_counter() - t0, 3)
    rep.check()
    return rep
