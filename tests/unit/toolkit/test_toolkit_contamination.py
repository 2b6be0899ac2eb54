"""contamination: planted leaks (verbatim, reworded near-copy, eval text embedded in a longer row) are found,
clean evaluation examples are not, same-generator data is flagged, and the cleaned copy accounts for every row."""

from __future__ import annotations

import random
from pathlib import Path

from toolkit_helpers import assert_accounted, chat, write_rows

from tunelab.data.readers import read_conversations
from tunelab.data.toolkit.contamination import (
    ContaminationConfig,
    check_overlap,
    contamination,
    overlap_warning,
)

VOCAB = ("account billing invoice refund password login email shipping order parcel warehouse courier "
         "subscription plan upgrade downgrade cancel renew discount coupon receipt payment card bank").split()


def make(rng: random.Random, n: int = 30) -> str:
    return " ".join(rng.choice(VOCAB) for _ in range(n))


def planted(tmp_path: Path) -> tuple[Path, Path, list[str]]:
    rng = random.Random(11)
    eval_q = [make(rng) for _ in range(6)]
    train = [chat(make(rng)) for _ in range(20)]
    train.insert(3, chat(eval_q[0]))                                    # verbatim leak of eval 1
    words = eval_q[1].split()
    words[-1] = "zebra"
    train.insert(8, chat(" ".join(words)))                              # near copy of eval 2
    train.insert(12, chat("Background first. " + eval_q[2] + " And then a long unrelated tail " * 3))  # embedded
    ev = [chat(q) for q in eval_q]
    return write_rows(tmp_path / "train.jsonl", train), write_rows(tmp_path / "eval.jsonl", ev), eval_q


def test_file_check_finds_planted_leaks_only(tmp_path: Path) -> None:
    train, ev, _ = planted(tmp_path)
    rep, step = contamination(train, ev)
    assert step is None
    assert rep.leaked_eval == [0, 1, 2]
    by_eval = {lk.eval_index: lk for lk in rep.leaks}
    assert by_eval[0].train_line == 4 and by_eval[0].method == "exact"
    assert by_eval[1].train_line == 9 and by_eval[1].method in ("ngram", "minhash")
    assert by_eval[2].train_line == 13 and by_eval[2].method == "ngram"
    assert rep.same_generator == []
    assert "3 of 6 evaluation examples" in rep.summary()


def test_cleaned_copy_drops_leaked_rows_with_reasons(tmp_path: Path) -> None:
    train, ev, _ = planted(tmp_path)
    out, rej = tmp_path / "clean.jsonl", tmp_path / "rej.jsonl"
    rep, step = contamination(train, ev, output=out, rejects=rej)
    assert step is not None and step.reasons == {"eval_leak": 3}
    kept, dropped = assert_accounted(23, out, rej)
    assert [r["line"] for r in dropped] == [4, 9, 13] and dropped[0]["eval_lines"] == [1]
    again, _ = contamination(out, ev)
    assert again.leaks == []


def test_check_overlap_on_records_for_train(tmp_path: Path) -> None:
    train, ev, _ = planted(tmp_path)
    rep = check_overlap(read_conversations(train), read_conversations(ev))
    assert rep.leaked_eval == [0, 1, 2] and sorted(lk.train_line for lk in rep.leaks) == [4, 9, 13]
    strict = check_overlap(read_conversations(train), read_conversations(ev),
                           ContaminationConfig(min_overlap=0.7, threshold=0.95))
    assert 0 in strict.leaked_eval and 2 in strict.leaked_eval


def test_impossible_lsh_settings_are_a_config_error() -> None:
    import pytest
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="too high for num_perm"):
        ContaminationConfig(threshold=0.99, num_perm=128)


def test_same_generator_is_flagged(tmp_path: Path) -> None:
    gen = {"metadata": {"generator": {"model": "gpt-x", "topic": "t"}}}
    train = write_rows(tmp_path / "t.jsonl", [{**chat("alpha beta gamma delta"), **gen}])
    ev = write_rows(tmp_path / "e.jsonl", [{**chat("something else entirely here"), **gen}])
    rep, _ = contamination(train, ev)
    assert rep.leaks == [] and rep.same_generator == ["gpt-x"]
    assert "same generator" in rep.summary()


def test_overlap_warning_for_train(tmp_path: Path) -> None:
    train, ev, _ = planted(tmp_path)
    msg = overlap_warning(read_conversations(train), read_conversations(ev), "test")
    assert msg is not None and msg.startswith("3 of 6 test examples") and "lines 1, 2, 3" in msg
    clean_eval = write_rows(tmp_path / "clean.jsonl", [chat("an entirely different question about gardening")])
    assert overlap_warning(read_conversations(train), read_conversations(clean_eval)) is None
