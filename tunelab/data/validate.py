"""Dataset validation: every problem with its 1-based line and field, then a summary (examples, tokens per
example with the real tokenizer and chat template, truncation, duplicates). `tunelab data validate` prints
it; training runs the same checks first and refuses bad data the same way.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.data.readers import ParseResult, parse_file
from tunelab.data.records import Conversation, Preference, Record
from tunelab.data.templates import Encoded, encode, tool_format
from tunelab.errors import Issue, TunelabError

MIN_EXAMPLES = 10  # OpenAI's minimum; fewer rarely changes behaviour and usually means a wrong file


@dataclass
class Report:
    path: str
    format: str | None
    examples: int
    issues: list[Issue]
    token_stats: dict[str, float] = field(default_factory=dict)
    truncated: int = 0
    duplicates: int = 0
    trained_tokens: int = 0
    records: list[Record] = field(default_factory=list)
    """The parsed records (valid lines): a run reads its data file once, here."""
    encoded: dict[int, Encoded] = field(default_factory=dict)
    """id(record) -> its encoding under the run's rule, for conversation records: a run tokenizes them once, here."""

    @property
    def errors(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "error"]

    @property
    def warnings(self) -> list[Issue]:
        return [i for i in self.issues if i.severity == "warning"]

    @property
    def ok(self) -> bool:
        return not self.errors

    def summary_lines(self) -> list[str]:
        lines = [f"file: {self.path}", f"format: {self.format or 'unknown'}", f"examples: {self.examples}"]
        if self.token_stats:
            s = self.token_stats
            lines.append(f"tokens per example: min {s['min']:.0f}, mean {s['mean']:.1f}, max {s['max']:.0f}")
            lines.append(f"trained tokens: {self.trained_tokens}")
        lines.append(f"would be truncated: {self.truncated}")
        lines.append(f"exact duplicates: {self.duplicates}")
        lines.append(f"errors: {len(self.errors)}, warnings: {len(self.warnings)}")
        return lines

    def to_json(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "format": self.format,
            "examples": self.examples,
            "token_stats": self.token_stats,
            "trained_tokens": self.trained_tokens,
            "truncated": self.truncated,
            "duplicates": self.duplicates,
            "errors": [str(i) for i in self.errors],
            "warnings": [str(i) for i in self.warnings],
        }


def dataset_checks(res: ParseResult, min_examples: int = MIN_EXAMPLES) -> tuple[list[Issue], int]:
    """Checks across lines: too few examples, exact duplicates (warning, naming both lines)."""
    issues: list[Issue] = []
    n = len(res.records)
    if res.format is not None and 0 < n < min_examples and not res.errors:
        issues.append(Issue(res.path, None, None, f"only {n} valid example(s); at least {min_examples} are required"))
    seen: dict[str, int] = {}
    dups = 0
    for r in res.records:
        k = r.key()
        line = r.source.line if r.source else 0
        if k in seen:
            dups += 1
            issues.append(Issue(res.path, line, None, f"exact duplicate of line {seen[k]}", "warning"))
        else:
            seen[k] = line
    return issues, dups


def token_checks(
    res: ParseResult, tokenizer: Any, max_seq_len: int | None, train_on: str = "assistant",
    system_prompt: str | None = None,
) -> tuple[list[Issue], list[int], int, int, dict[int, Encoded]]:
    """Per-record token checks with the run's own label rule (`train_on`) and `system_prompt`; trained tokens
    are those left after truncation to max_seq_len, i.e. what training puts loss on. Also returns the
    conversation records' encodings by id(record), which training reuses."""
    issues: list[Issue] = []
    encoded: dict[int, Encoded] = {}
    lengths: list[int] = []
    truncated = trained = 0
    for r in res.records:
        convs = r.as_conversations() if isinstance(r, Preference) else (r,)
        longest = 0
        for c in convs:
            assert isinstance(c, Conversation)
            enc = encode(tokenizer, c, train_on=train_on, max_len=max_seq_len, system_prompt=system_prompt)
            if c is r:
                encoded[id(r)] = enc
            longest = max(longest, enc.full_length)
            trained += enc.num_trained
            if enc.num_trained == 0 and c.label is None:
                issues.append(Issue(res.path, r.source.line if r.source else None, None,
                                    "no trained tokens after rendering (every assistant turn has weight 0?)", "warning"))
        lengths.append(longest)
        if max_seq_len is not None and longest > max_seq_len:
            truncated += 1
            issues.append(
                Issue(res.path, r.source.line if r.source else None, None,
                      f"{longest} tokens > max_seq_len {max_seq_len}: would be truncated", "warning")
            )
    return issues, lengths, truncated, trained, encoded


def tool_support_issue(res: ParseResult, tokenizer: Any) -> Issue | None:
    """An error at the first line that uses tools when the tokenizer's chat template cannot render them."""
    def uses(r: Record) -> bool:
        msgs = (*r.prompt, *r.chosen, *r.rejected) if isinstance(r, Preference) else r.messages
        return bool(r.tools) or any(m.tool_calls for m in msgs)

    first = next((r for r in res.records if uses(r)), None)
    if first is None:
        return None
    try:
        tool_format(tokenizer)
    except TunelabError as e:
        return Issue(res.path, first.source.line if first.source else None, "tools", str(e))
    return None


def validate_file(
    path: str | Path,
    tokenizer: Any | None = None,
    max_seq_len: int | None = None,
    expect: str | None = None,
    min_examples: int = MIN_EXAMPLES,
    train_on: str = "assistant",
    system_prompt: str | None = None,
) -> Report:
    """Parse and check `path`; with a tokenizer, also token counts under the run's `train_on`/`system_prompt`."""
    res = parse_file(path, expect)
    issues = list(res.issues)
    extra, dups = dataset_checks(res, min_examples)
    issues.extend(extra)
    rep = Report(str(path), res.format, len(res.records), issues, duplicates=dups, records=list(res.records))
    if tokenizer is not None and res.records and (problem := tool_support_issue(res, tokenizer)) is not None:
        rep.issues.append(problem)  # one error for the file, not one per line: the template is the problem
    elif tokenizer is not None and res.records:
        tissues, lengths, rep.truncated, rep.trained_tokens, rep.encoded = token_checks(
            res, tokenizer, max_seq_len, train_on, system_prompt)
        rep.issues.extend(tissues)
        rep.token_stats = {"min": min(lengths), "mean": statistics.fmean(lengths), "max": max(lengths)}
    rep.issues.sort(key=lambda i: (i.line or 0, i.severity != "error"))
    return rep
