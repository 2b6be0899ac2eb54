"""Every validation case the core issue lists, on the reader/validator directly and through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import tiny

from tunelab.data.readers import parse_file
from tunelab.data.records import Conversation, Preference
from tunelab.data.validate import validate_file

GOOD = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}


def write(tmp_path: Path, lines: list[str | bytes], name: str = "d.jsonl") -> Path:
    p = tmp_path / name
    data = b"".join((ln if isinstance(ln, bytes) else ln.encode()) + b"\n" for ln in lines)
    p.write_bytes(data)
    return p


def good_lines(n: int) -> list[str | bytes]:
    return [json.dumps(r) for r in tiny.chat_rows(n)]


def errors_of(p: Path) -> list[tuple[int | None, str | None, str]]:
    rep = validate_file(p)
    return [(i.line, i.field, i.message) for i in rep.errors]


def warnings_of(p: Path) -> list[tuple[int | None, str | None, str]]:
    rep = validate_file(p)
    return [(i.line, i.field, i.message) for i in rep.warnings]


@pytest.mark.parametrize(
    ("bad", "field", "fragment"),
    [
        ("{not json", None, "not valid JSON"),
        ("[1, 2]", None, "expected a JSON object"),
        ('"just a string"', None, "expected a JSON object"),
        ('{"messages": []}', "messages", "is empty"),
        ('{"messages": null}', "messages", "missing"),
        ('{"messages": "hi"}', "messages", "must be a list"),
        ('{"messages": [{"content": "x"}, {"role": "assistant", "content": "y"}]}', "messages[0].role", "missing 'role'"),
        ('{"messages": [{"role": "user"}, {"role": "assistant", "content": "y"}]}', "messages[0].content", "missing 'content'"),
        ('{"messages": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}', "messages[0].role", "unknown role"),
        ('{"messages": [{"role": "user", "content": "x", "mood": 1}, {"role": "assistant", "content": "y"}]}', "messages[0].mood", "unknown key"),
        ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "y"}]}', "messages[0].content", "must be a string"),
        ('{"messages": [{"role": "user", "content": "x"}]}', "messages", "no assistant message"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 2}]}', "messages[1].weight", "0 or 1"),
        ('{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}], "extra": 1}', "extra", "unknown key"),
    ],
)
def test_line_errors_name_line_and_field(tmp_path: Path, bad: str, field: str | None, fragment: str) -> None:
    p = write(tmp_path, [*good_lines(5), bad, *good_lines(6)])
    errs = errors_of(p)
    assert len(errs) == 1, errs
    line, fld, msg = errs[0]
    assert line == 6
    assert fld == field
    assert fragment in msg


def test_not_utf8(tmp_path: Path) -> None:
    p = write(tmp_path, [*good_lines(10), b'{"messages": "\xff\xfe"}'])
    assert errors_of(p) == [(11, None, "line is not valid UTF-8")]


def test_ends_on_user_turn_is_warning(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                        {"role": "user", "content": "c"}]}
    p = write(tmp_path, [*good_lines(10), json.dumps(row)])
    assert errors_of(p) == []
    assert any(w[0] == 11 and "ends on a user turn" in w[2] for w in warnings_of(p))


def test_preference_rows(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}) for i in range(10)]
    rows.append(json.dumps({"prompt": "q", "chosen": "same"}))
    rows.append(json.dumps({"prompt": "q", "chosen": "same", "rejected": "same"}))
    rows.append(json.dumps({"prompt": [{"role": "user", "content": "q"}],
                            "chosen": [{"role": "assistant", "content": "a"}], "rejected": "b"}))
    p = write(tmp_path, rows)
    errs = errors_of(p)
    assert (11, "rejected", "missing required field 'rejected'") in errs
    assert any(e[0] == 12 and "identical" in e[2] for e in errs)
    res = parse_file(p)
    assert res.format == "preference"
    assert all(isinstance(r, Preference) for r in res.records)
    assert len(res.records) == 11


def test_mixed_formats(tmp_path: Path) -> None:
    p = write(tmp_path, [*good_lines(10), json.dumps({"prompt": "a", "completion": "b"})])
    errs = errors_of(p)
    assert len(errs) == 1 and errs[0][0] == 11 and "mixed formats" in errs[0][2]


def test_empty_file_and_too_few(tmp_path: Path) -> None:
    assert any("empty" in e[2] for e in errors_of(write(tmp_path, [], "empty.jsonl")))
    assert any("empty" in e[2] for e in errors_of(write(tmp_path, ["", "  "], "blank.jsonl")))
    few = errors_of(write(tmp_path, good_lines(3), "few.jsonl"))
    assert any("at least 10" in e[2] for e in few)


def test_duplicates_are_warnings(tmp_path: Path) -> None:
    lines = good_lines(10)
    p = write(tmp_path, [*lines, lines[2]])
    assert errors_of(p) == []
    assert (11, None, "exact duplicate of line 3") in warnings_of(p)
    assert validate_file(p).duplicates == 1


def test_bom_crlf_trailing_blank_lines_accepted(tmp_path: Path) -> None:
    body = "\r\n".join(json.dumps(r) for r in tiny.chat_rows(10)) + "\r\n\r\n\r\n"
    p = tmp_path / "win.jsonl"
    p.write_bytes(b"\xef\xbb\xbf" + body.encode())
    rep = validate_file(p)
    assert rep.errors == [] and rep.warnings == [] and rep.examples == 10


def test_token_stats_and_truncation(tmp_path: Path, tok: object) -> None:
    rows = tiny.chat_rows(10)
    rows[4]["messages"][1]["content"] = "x" * 300
    p = write(tmp_path, [json.dumps(r) for r in rows])
    rep = validate_file(p, tok, max_seq_len=100)
    assert rep.truncated == 1
    assert any(w.line == 5 and "would be truncated" in w.message for w in rep.warnings)
    assert rep.token_stats["max"] > 300 and rep.token_stats["min"] < 100


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "Translate: hi", "completion": " salut"}, [("user", "Translate: hi"), ("assistant", " salut")]),
        ({"instruction": "Add", "input": "1 2", "output": "3"}, [("user", "Add\n\n1 2"), ("assistant", "3")]),
        ({"conversations": [{"from": "system", "value": "s"}, {"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]},
         [("system", "s"), ("user", "q"), ("assistant", "a")]),
        ({"messages": [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a", "weight": 0},
                       {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2", "weight": 1}]},
         [("user", "q"), ("assistant", "a"), ("user", "q2"), ("assistant", "a2")]),
    ],
)
def test_readers_produce_conversations(tmp_path: Path, row: dict, expected: list[tuple[str, str]]) -> None:
    p = write(tmp_path, [json.dumps(row)] * 1)
    res = parse_file(p)
    assert not res.errors
    (rec,) = res.records
    assert isinstance(rec, Conversation)
    assert [(m.role, m.content) for m in rec.messages] == expected
    assert rec.source is not None and rec.source.line == 1


def test_message_weight_and_name_kept(tmp_path: Path) -> None:
    row = {"messages": [{"role": "user", "content": "q", "name": "bob"}, {"role": "assistant", "content": "a", "weight": 0},
                        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]}
    (rec,) = parse_file(write(tmp_path, [json.dumps(row)])).records
    assert isinstance(rec, Conversation)
    assert rec.messages[0].name == "bob" and rec.messages[1].weight == 0
    assert rec.to_json()["messages"][1]["weight"] == 0


def test_kto_unpaired_rows(tmp_path: Path) -> None:
    rows = [json.dumps({"prompt": "q", "completion": "a", "label": True}),
            json.dumps({"prompt": "q", "completion": "b", "label": "yes"})]
    res = parse_file(write(tmp_path, rows))
    assert res.format == "unpaired"
    assert res.records[0].label is True  # type: ignore[union-attr]
    assert res.errors[0].line == 2 and res.errors[0].field == "label"


def test_cli_validate_exit_codes_and_no_traceback(tmp_path: Path) -> None:
    good = write(tmp_path, good_lines(12), "good.jsonl")
    bad = write(tmp_path, [*good_lines(10), '{"messages": [{"role": "user", "content": "x"}]}'], "bad.jsonl")
    run = [sys.executable, "-m", "tunelab.cli", "data", "validate", "--model", "none"]
    ok = subprocess.run([*run, str(good)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "examples: 12" in ok.stdout
    ko = subprocess.run([*run, str(bad)], capture_output=True, text=True)
    assert ko.returncode == 1
    assert "bad.jsonl:11 [messages]: error: no assistant message" in ko.stdout.replace("\n", " ")
    assert "Traceback" not in ko.stderr + ko.stdout
    missing = subprocess.run([*run, str(tmp_path / "nope.jsonl")], capture_output=True, text=True)
    assert missing.returncode == 1 and "file not found" in missing.stderr and "Traceback" not in missing.stderr


def test_trained_tokens_follow_the_runs_train_on_and_system_prompt(tmp_path: Path, tok: object) -> None:
    """Jobs report trained_tokens from this count: it must use the run's own label rule, not "assistant"."""
    p = write(tmp_path, good_lines(12))
    plain = validate_file(p, tok, 512)
    every = validate_file(p, tok, 512, train_on="all")
    assert 0 < plain.trained_tokens < every.trained_tokens
    with_sys = validate_file(p, tok, 512, train_on="all", system_prompt="You answer in JSON.")
    assert with_sys.trained_tokens > every.trained_tokens and with_sys.token_stats["max"] > every.token_stats["max"]
    assert len(plain.records) == plain.examples == 12  # the parsed records come back: the file is read once
    short = validate_file(p, tok, 8, train_on="all")
    assert short.trained_tokens <= 8 * 12 and short.truncated == 12  # counted after truncation, as trained
