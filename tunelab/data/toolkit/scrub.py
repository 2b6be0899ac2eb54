"""PII scrubbing: finds personal data in every text field of a row and replaces it with a typed placeholder
(<EMAIL>, <PHONE>, <CREDIT_CARD>, <SSN>, <IP_ADDRESS>, <IBAN>, <URL>, <PERSON>).

Engine "regex" (default) is ours: patterns plus checksums where a type has one (Luhn for cards, ISO 7064
mod-97 for IBANs, octet ranges for IPv4, `ipaddress` for IPv6, SSA rules for SSNs), and a heuristic name
recogniser (titles, "my name is", a list of common first names before a capitalised surname). Engine
"presidio" uses `presidio-analyzer` if it is installed with a spaCy model (not a dependency: its models are
downloaded from a hub, which tunelab never does). Found values are never logged: reports and the audit
file carry types, counts and the scrubbed row only.
"""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from tunelab.data.toolkit.io import (
    JsonlWriter,
    RejectWriter,
    StepReport,
    Workspace,
    default_rejects,
    iter_batches,
    load_rows,
    map_rows,
    map_texts,
    parse_raw,
    progress,
    raw_or_text,
)
from tunelab.errors import TunelabError

PII_TYPES = ("EMAIL", "URL", "IBAN", "CREDIT_CARD", "SSN", "IP_ADDRESS", "PHONE", "PERSON")


class ScrubConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    engine: Literal["regex", "presidio"] = "regex"
    types: list[str] = list(PII_TYPES)
    """Which PII types to replace; the rest are left alone."""
    num_proc: int | None = None


# ----------------------------------------------------------------------------------------- validators


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = int(ch)
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def iban_ok(text: str) -> bool:
    s = text.replace(" ", "").upper()
    if not (15 <= len(s) <= 34) or not s[:2].isalpha() or not s[2:4].isdigit():
        return False
    moved = s[4:] + s[:4]
    num = "".join(str(int(ch, 36)) for ch in moved)
    return int(num) % 97 == 1


def _card_ok(m: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 13 <= len(digits) <= 19 and luhn_ok(digits) and len(set(digits)) > 1


def _ssn_ok(m: re.Match[str]) -> bool:
    area, group, serial = m.group(1), m.group(2), m.group(3)
    return area not in ("000", "666") and not area.startswith("9") and group != "00" and serial != "0000"


def _ip_ok(m: re.Match[str]) -> bool:
    try:
        ipaddress.ip_address(m.group())
    except ValueError:
        return False
    return True


def _phone_ok(m: re.Match[str]) -> bool:
    digits = re.sub(r"\D", "", m.group())
    return 7 <= len(digits) <= 15


_FIRST_NAMES = (
    "James John Robert Michael William David Richard Joseph Thomas Charles Christopher Daniel Matthew Anthony "
    "Mark Donald Steven Paul Andrew Joshua Kenneth Kevin Brian George Timothy Ronald Jason Edward Jeffrey Ryan "
    "Jacob Gary Nicholas Eric Jonathan Stephen Larry Justin Scott Brandon Benjamin Samuel Gregory Alexander "
    "Patrick Frank Raymond Jack Dennis Jerry Tyler Aaron Peter Henry Adam Nathan Zachary Kyle Ethan Noah Liam "
    "Mary Patricia Jennifer Linda Elizabeth Barbara Susan Jessica Sarah Karen Lisa Nancy Betty Margaret Sandra "
    "Ashley Kimberly Emily Donna Michelle Carol Amanda Melissa Deborah Stephanie Rebecca Sharon Laura Cynthia "
    "Kathleen Amy Angela Shirley Anna Brenda Pamela Emma Nicole Helen Samantha Katherine Christine Debra Rachel "
    "Carolyn Janet Catherine Maria Heather Diane Ruth Julie Olivia Joyce Virginia Victoria Kelly Lauren Christina "
    "Joan Evelyn Judith Megan Andrea Cheryl Hannah Jacqueline Martha Gloria Teresa Ann Sara Madison Frances "
    "Kathryn Janice Jean Abigail Alice Julia Judy Sophia Grace Denise Amber Doris Marilyn Danielle Beverly "
    "Isabella Theresa Diana Natalie Brittany Charlotte Marie Kayla Alexis Lori Ahmed Mohammed Wei Li Juan Carlos "
    "Jose Luis Ana Sofia Lucas Hans Anna Pierre Marco Giulia Yuki Hiroshi Priya Raj Arjun Fatima Olga Ivan"
).split()
_NAME = r"[A-Z][a-z]+(?:[-'][A-Z][a-z]+)?"
_PERSON_RES = [
    # A title makes the following capitalised words a name.
    re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Dr|Prof|Sir|Madam)\.?\s+(?:{_NAME}\s+)?{_NAME}\b"),
    # "my name is Jane Doe", "I'm called Jane"
    re.compile(rf"(?i:\b(?:my name is|i am called|i'm called|name:)\s+)({_NAME}(?:\s+{_NAME})?)"),
    # A common first name followed by a capitalised surname (first word checked against _FIRST_NAME_SET).
    # Only the first word is consumed (surname in a lookahead) so "Hello Sarah Connor" still finds Sarah.
    re.compile(rf"\b([A-Z][a-z]+)(?=\s+({_NAME})\b)"),
]
_FIRST_NAME_SET = frozenset(_FIRST_NAMES)

Recogniser = tuple[str, re.Pattern[str], Callable[[re.Match[str]], bool] | None, Callable[[str], bool]]
_DIGIT = re.compile(r"\d")


def _has_digit(t: str) -> bool:
    return _DIGIT.search(t) is not None


# Order matters: a span taken by an earlier type is not matched again (a URL's digits are not a phone).
# The last element is a cheap pre-check: a text without "@" cannot hold an email, so the regex never runs.
_RECOGNISERS: list[Recogniser] = [
    ("EMAIL", re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b"), None,
     lambda t: "@" in t),
    ("URL", re.compile(r"\b(?:https?://|www\.)[^\s<>\"')\]]+[^\s<>\"')\].,;:!?]"), None,
     lambda t: "://" in t or "www." in t),
    ("IBAN", re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){2,7}(?: ?[A-Z0-9]{1,3})?\b"),
     lambda m: iban_ok(m.group()), _has_digit),
    ("CREDIT_CARD", re.compile(r"\b(?:\d[ -]?){12,18}\d\b"), _card_ok, _has_digit),
    ("SSN", re.compile(r"\b(\d{3})-(\d{2})-(\d{4})\b"), _ssn_ok, lambda t: "-" in t),
    ("IP_ADDRESS", re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b"), _ip_ok, lambda t: "." in t),
    ("IP_ADDRESS", re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?![\w:])"
                              r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:)+:(?:[0-9A-Fa-f]{1,4}:?)*[0-9A-Fa-f]{1,4}(?![\w:])"),
     _ip_ok, lambda t: "::" in t or t.count(":") >= 2),
    # Not part of a longer digit-group run (a failed card or IBAN check must not turn into a "phone").
    ("PHONE", re.compile(r"(?<![\w+])(?<!\d[ .-])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?|\d{2,4}[ .-])"
                         r"\d{3,4}[ .-]\d{3,4}(?![ .-]?\d)(?!\w)|(?<![\w+])\+\d{7,14}\b"), _phone_ok, _has_digit),
]


def find_pii(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans, earlier recognisers winning."""
    taken: list[tuple[int, int, str]] = []

    def free(s: int, e: int) -> bool:
        return all(e <= a or s >= b for a, b, _ in taken)

    for kind, rx, check, maybe in _RECOGNISERS:
        if kind not in types or not maybe(text):
            continue
        for m in rx.finditer(text):
            if (check is None or check(m)) and free(m.start(), m.end()):
                taken.append((m.start(), m.end(), kind))
    if "PERSON" in types:
        for k, rx in enumerate(_PERSON_RES):
            for m in rx.finditer(text):
                if k == 2:  # first-name rule: the whole match, if the first word is a known first name
                    if m.group(1) not in _FIRST_NAME_SET:
                        continue
                    s, e = m.start(1), m.end(2)
                else:
                    s, e = (m.start(1), m.end(1)) if rx.groups else (m.start(), m.end())
                if free(s, e):
                    taken.append((s, e, "PERSON"))
    return sorted(taken)


def _presidio() -> Any:
    try:
        from presidio_analyzer import AnalyzerEngine
    except ImportError as e:
        raise TunelabError(
            "scrub engine 'presidio' needs presidio-analyzer and a spaCy model installed "
            "(pip install presidio-analyzer; the spaCy model is a separate download); use --engine regex", 2
        ) from e
    try:
        return AnalyzerEngine()
    except Exception as e:  # a missing spaCy model surfaces here
        raise TunelabError(f"presidio could not start ({type(e).__name__}): {e}; use --engine regex", 2) from e


_PRESIDIO_TYPES = {"EMAIL_ADDRESS": "EMAIL", "PHONE_NUMBER": "PHONE", "CREDIT_CARD": "CREDIT_CARD",
                   "US_SSN": "SSN", "IP_ADDRESS": "IP_ADDRESS", "IBAN_CODE": "IBAN", "URL": "URL", "PERSON": "PERSON"}
_ANALYZER: Any = None


def find_pii_presidio(text: str, types: tuple[str, ...] | list[str] = PII_TYPES) -> list[tuple[int, int, str]]:
    global _ANALYZER
    if _ANALYZER is None:
        _ANALYZER = _presidio()
    spans: list[tuple[int, int, str]] = []
    for r in sorted(_ANALYZER.analyze(text=text, language="en"), key=lambda r: (-r.score, r.start)):
        kind = _PRESIDIO_TYPES.get(r.entity_type)
        if kind is not None and kind in types and all(r.end <= a or r.start >= b for a, b, _ in spans):
            spans.append((r.start, r.end, kind))
    return sorted(spans)


def scrub_text(text: str, types: tuple[str, ...] | list[str] = PII_TYPES, engine: str = "regex",
               counts: Counter[str] | None = None) -> str:
    """The text with every PII span replaced by <TYPE>; `counts` (if given) is incremented per type."""
    spans = find_pii_presidio(text, types) if engine == "presidio" else find_pii(text, types)
    if not spans:
        return text
    parts, pos = [], 0
    for s, e, kind in spans:
        parts.append(text[pos:s])
        parts.append(f"<{kind}>")
        pos = e
        if counts is not None:
            counts[kind] += 1
    parts.append(text[pos:])
    return "".join(parts)


def _scrub_batch(batch: dict[str, list[Any]], types: list[str], engine: str) -> dict[str, list[Any]]:
    raws, pii, ok = [], [], []
    for raw in batch["_raw"]:
        obj, fmt = parse_raw(raw)
        if obj is None or fmt is None:
            raws.append(raw)
            pii.append("")
            ok.append(False)
            continue
        counts: Counter[str] = Counter()
        new = map_texts(obj, fmt, lambda t, c=counts: scrub_text(t, types, engine, c))  # type: ignore[misc]
        ok.append(True)
        if counts:
            raws.append(json.dumps(new, ensure_ascii=False))
            pii.append(json.dumps(dict(counts)))
        else:
            raws.append(raw)
            pii.append("")
    return {"_raw": raws, "_pii": pii, "_ok": ok}


def scrub(
    input: str | Path,
    output: str | Path,
    config: ScrubConfig | None = None,
    rejects: str | Path | None = None,
) -> StepReport:
    """Replace PII in every row. Changed rows go to the audit file (types and counts, scrubbed row only);
    unparseable rows are rejected. Rows in = rows out + rows rejected."""
    cfg = config or ScrubConfig()
    unknown = sorted(set(cfg.types) - set(PII_TYPES))
    if unknown:
        raise TunelabError(f"scrub: unknown PII type(s) {unknown}; known: {', '.join(PII_TYPES)}", 2)
    if cfg.engine == "presidio":
        find_pii_presidio("warm up")  # fail early with a clear message, before any work
    t0 = time.perf_counter()
    rejects = rejects or default_rejects(output)
    rep = StepReport("scrub", str(input), str(output), str(rejects))
    totals: Counter[str] = Counter()
    with Workspace() as ws:
        ds = load_rows(input, ws)
        rep.rows_in = len(ds)
        ds = map_rows(ds, _scrub_batch, f"scanning {len(ds):,} rows", cfg.num_proc,
                      {"types": list(cfg.types), "engine": cfg.engine}, "scrub")
        rej = RejectWriter(rejects, "scrub")
        out = JsonlWriter(output)
        with progress() as bar:
            task = bar.add_task("writing", total=len(ds))
            for batch in iter_batches(ds, ["_line", "_raw", "_pii", "_ok"]):
                for line, raw, pii, ok in zip(batch["_line"], batch["_raw"], batch["_pii"], batch["_ok"],
                                              strict=True):
                    if not ok:
                        rej.write(line, parse_raw(raw)[1] or "unparseable", raw_or_text(raw))
                        continue
                    out.write_raw(raw)
                    if pii:
                        counts = json.loads(pii)
                        totals.update(counts)
                        rep.rows_changed += 1
                        rej.audit(line, "pii_replaced", json.loads(raw), pii=counts)
                bar.advance(task, len(batch["_line"]))
        out.close()
        rej.close()
    rep.rows_out = out.count
    rep.rows_rejected = rej.total
    rep.reasons = dict(rej.counts)
    rep.details = {"engine": cfg.engine, "pii_counts": dict(totals), "audit": str(rejects)}
    rep.seconds = round(time.perf_counter() - t0, 3)
    rep.check()
    return rep
