"""stats numbers on a known file, the YAML data.pipeline chain (rows accounted across steps), and the
`tunelab data ...` commands end to end (exit codes, no PII in the output)."""

from __future__ import annotations

from pathlib import Path

import pytest
import tiny
from toolkit_helpers import chat, read_jsonl, write_rows

from tunelab.cli import main
from tunelab.data.toolkit.pipeline import load_pipeline, run_pipeline
from tunelab.data.toolkit.stats import dataset_stats
from tunelab.errors import ConfigError


def known_file(tmp_path: Path) -> Path:
    rows = [
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "one two three"},
                      {"role": "assistant", "content": "four five"}]},
        chat("hello there", "general kenobi"),
        chat("hello there", "general kenobi"),
        chat("a b c d e f g h", "i j"),
        "oops",
    ]
    return write_rows(tmp_path / "known.jsonl", rows)


def test_stats_numbers_and_histogram(tmp_path: Path) -> None:
    s = dataset_stats(known_file(tmp_path), histogram=tmp_path / "hist.png")
    assert (s["rows"], s["examples"], s["unparseable"]) == (5, 4, 1)
    assert s["token_unit"] == "words"
    # words per example: 2+3+2=7, 2+2=4, 4, 8+2=10
    assert s["tokens"]["total"] == 25 and s["tokens"]["max"] == 10 and s["tokens"]["min"] == 4
    assert s["turns"]["total"] == 9 and s["turns"]["histogram"] == {"2": 3, "3": 1}
    assert s["roles"] == {"system": 1, "user": 4, "assistant": 4}
    assert s["duplicates"] == 1 and s["duplicate_rate"] == 0.25
    png = Path(s["histogram"])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_stats_with_a_tokenizer(tmp_path: Path) -> None:
    s = dataset_stats(known_file(tmp_path), tokenizer=tiny.tiny_tokenizer())
    # byte-level tokenizer: tokens = UTF-8 bytes of the turns joined by newlines
    assert s["token_unit"] == "tokens" and s["tokens"]["total"] == len(b"be brief\none two three\nfour five") + \
        2 * len("hello there\ngeneral kenobi") + len("a b c d e f g h\ni j")


PIPELINE = """
data:
  train: out/train.jsonl
  pipeline:
    input: raw.jsonl
    output: out/train.jsonl
    work_dir: out/work
    steps:
      - dedup: {threshold: 0.8}
      - scrub: {}
      - filter: {min_tokens: 3, tokenizer: words, max_repetition: 0.5}
      - contamination: {eval: eval.jsonl}
"""


def test_pipeline_chains_steps_and_accounts_for_every_row(tmp_path: Path) -> None:
    rows = [
        chat("How do I update my billing address in the account settings page?", "Open settings, then billing."),
        chat("How do I update my billing address in the account settings page?", "Open settings, then billing."),
        chat("Email me at someone@example.com about the refund for order 5521", "We will write to you soon."),
        chat("x", "y"),
        chat("Loop", "again and again and again and again and again and again and again"),
        chat("What is the warranty period for the blue kettle model?", "Two years from the purchase date."),
    ]
    write_rows(tmp_path / "raw.jsonl", rows)
    write_rows(tmp_path / "eval.jsonl", [chat("What is the warranty period for the blue kettle model?",
                                              "Two years from the purchase date.")])
    (tmp_path / "prep.yaml").write_text(PIPELINE)
    cfg, base = load_pipeline(tmp_path / "prep.yaml")
    summary = run_pipeline(cfg, base)
    assert summary["rows_in"] == 6 and summary["rows_out"] == 2 and summary["rows_rejected"] == 4
    assert [s["step"] for s in summary["steps"]] == ["dedup", "scrub", "filter", "contamination"]
    for s in summary["steps"]:
        assert s["rows_in"] == s["rows_out"] + s["rows_rejected"]
    final = read_jsonl(tmp_path / "out" / "train.jsonl")
    assert final[1]["messages"][0]["content"].startswith("Email me at <EMAIL>")
    work = tmp_path / "out" / "work"
    reasons = sorted(r["reason"] for f in sorted(work.glob("*.rejects.jsonl")) for r in read_jsonl(f))
    assert reasons == ["eval_leak", "exact_duplicate", "pii_replaced", "repetitive", "too_short"]
    assert (work / "report.json").exists()


def test_pipeline_config_errors_name_the_field(tmp_path: Path) -> None:
    (tmp_path / "bad.yaml").write_text("data:\n  pipeline:\n    input: a.jsonl\n    output: b.jsonl\n"
                                       "    steps:\n      - dedupe: {}\n")
    with pytest.raises(ConfigError, match="unknown step 'dedupe'"):
        load_pipeline(tmp_path / "bad.yaml")
    (tmp_path / "bad2.yaml").write_text("data:\n  pipeline:\n    input: a.jsonl\n    output: b.jsonl\n"
                                        "    steps:\n      - dedup: {treshold: 0.5}\n")
    with pytest.raises(ConfigError, match="treshold"):
        load_pipeline(tmp_path / "bad2.yaml")
    (tmp_path / "none.yaml").write_text("data:\n  train: x.jsonl\n")
    with pytest.raises(ConfigError, match="no 'data.pipeline' section"):
        load_pipeline(tmp_path / "none.yaml")


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
    return int(e.value.code or 0)


def test_cli_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = write_rows(tmp_path / "in.jsonl", [
        chat("my card is 4111 1111 1111 1111 and mail bob.smith@example.com"),
        chat("my card is 4111 1111 1111 1111 and mail bob.smith@example.com"),
        chat("a perfectly ordinary question about tea"),
    ])
    assert run_cli(["data", "dedup", str(src), "-o", str(tmp_path / "d.jsonl"), "--report", str(tmp_path / "r.json")]) == 0
    assert len(read_jsonl(tmp_path / "d.jsonl")) == 2 and read_jsonl(tmp_path / "d.rejects.jsonl")
    assert run_cli(["data", "scrub", str(src), "-o", str(tmp_path / "s.jsonl")]) == 0
    assert run_cli(["data", "stats", str(src), "--histogram", str(tmp_path / "h.png")]) == 0
    assert run_cli(["data", "contamination", str(src), str(tmp_path / "d.jsonl")]) == 0
    assert run_cli(["data", "filter", str(src), "-o", str(tmp_path / "f.jsonl"), "--tokenizer", "words",
                    "--min-tokens", "3"]) == 0
    printed = capsys.readouterr()
    text = printed.out + printed.err
    assert "CREDIT_CARD" in text and "4111" not in text and "bob.smith" not in text
    assert (tmp_path / "h.png").exists()


def test_cli_errors_exit_nonzero_without_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["data", "dedup", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "o.jsonl")]) == 1
    assert run_cli(["data", "dedup", str(tmp_path / "x.jsonl"), "-o", "o.jsonl", "--threshold", "3"]) == 2
    assert run_cli(["data", "scrub", str(tmp_path / "x.jsonl"), "-o", "o.jsonl", "--types", "email,shoe"]) != 0
    assert run_cli(["data", "synth", "-o", str(tmp_path / "s.jsonl"), "--topic", "tea", "--base-url",
                    "http://127.0.0.1:9/v1", "--retries", "0", "--cache-dir", str(tmp_path / "c")]) == 1
    (tmp_path / "empty.jsonl").write_text("")
    assert run_cli(["data", "stats", str(tmp_path / "empty.jsonl")]) == 1
    err = capsys.readouterr().err
    assert "file not found" in err and "threshold" in err and "file is empty" in err and "Traceback" not in err
    assert "no example was generated" in err
