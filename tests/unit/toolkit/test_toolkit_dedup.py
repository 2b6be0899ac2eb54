"""dedup: planted exact and near-duplicates are found, distinct texts are kept, every drop is accounted for."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from toolkit_helpers import assert_accounted, chat, read_jsonl, write_rows

from tunelab.data.toolkit.dedup import DedupConfig, dedup, lsh_params, minhash

WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa "
         "quebec romeo sierra tango uniform victor whiskey xray yankee zulu red green blue amber violet").split()


def sentence(rng: random.Random, n: int = 40) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def planted(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """30 distinct rows; row 31 = row 1 re-cased and re-spaced; row 32 = row 2 with its last word (of 40) changed;
    row 33 = an unparseable line."""
    rng = random.Random(7)
    texts = [sentence(rng) for _ in range(30)]
    rows: list[object] = [chat(t, f"answer {i}") for i, t in enumerate(texts)]
    rows.append(chat("  " + texts[0].upper().replace(" ", "   ") + " ", "ANSWER 0"))
    words = texts[1].split()
    words[-1] = "zzzz"  # one of 38 shingles differs: Jaccard ~0.95
    rows.append(chat(" ".join(words), "answer 1"))
    rows.append("{not json")
    return write_rows(tmp_path / "in.jsonl", rows), {"n": len(rows)}


@pytest.mark.parametrize("index", ["bands", "lsh"])
def test_finds_planted_duplicates_and_keeps_distinct(tmp_path: Path, index: str) -> None:
    src, meta = planted(tmp_path)
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    rep = dedup(src, out, DedupConfig(index=index), rej)
    kept, dropped = assert_accounted(meta["n"], out, rej)
    assert len(kept) == 30  # all 30 distinct texts survive, including rows 1 and 2 (the originals)
    by_line = {r["line"]: r for r in dropped}
    assert by_line[31]["reason"] == "exact_duplicate" and by_line[31]["duplicate_of"] == 1
    assert by_line[32]["reason"] == "near_duplicate"
    assert by_line[32]["duplicate_of"] in (2, "in.jsonl:2")
    assert by_line[33]["reason"] == "invalid_json" and by_line[33]["row"] == "{not json"
    assert rep.rows_in == 33 and rep.rows_out == 30 and rep.rows_rejected == 3
    assert rep.details["clusters"] == 2
    # kept rows are written back byte-for-byte
    assert (tmp_path / "out.jsonl").read_text().splitlines()[0] == src.read_text().splitlines()[0]


def test_near_duplicate_similarity_is_reported_and_above_threshold(tmp_path: Path) -> None:
    src, _ = planted(tmp_path)
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    dedup(src, out, DedupConfig(threshold=0.8), rej)
    near = [r for r in read_jsonl(rej) if r["reason"] == "near_duplicate"]
    assert len(near) == 1 and near[0]["similarity"] >= 0.8


def test_stricter_threshold_keeps_the_near_duplicate(tmp_path: Path) -> None:
    src, meta = planted(tmp_path)
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    dedup(src, out, DedupConfig(threshold=0.99, num_perm=256), rej)
    kept, dropped = assert_accounted(meta["n"], out, rej)
    assert len(kept) == 31 and sorted(r["reason"] for r in dropped) == ["exact_duplicate", "invalid_json"]


def test_roles_choose_what_is_compared(tmp_path: Path) -> None:
    # Same question, different answers: duplicates when only the user turn counts, distinct otherwise.
    rows = [chat("How do I reset my password on the portal?", f"Answer variant {i} " * 5) for i in range(3)]
    src = write_rows(tmp_path / "in.jsonl", rows)
    r_all = dedup(src, tmp_path / "a.jsonl", DedupConfig())
    r_user = dedup(src, tmp_path / "u.jsonl", DedupConfig(roles=["user"]))
    assert r_all.rows_out == 3
    assert r_user.rows_out == 1 and r_user.reasons == {"exact_duplicate": 2}


def test_exact_only_and_clusters_keep_first(tmp_path: Path) -> None:
    rows = [chat("same text"), chat("other"), chat("Same   TEXT!"), chat("same text.")]
    src = write_rows(tmp_path / "in.jsonl", rows)
    rep = dedup(src, tmp_path / "o.jsonl", DedupConfig(near=False))
    assert rep.rows_out == 2
    assert rep.details["largest_clusters"][0] == {"kept": 1, "dropped": [3, 4], "size": 3}


def test_lsh_parameters_and_minhash_estimate() -> None:
    b, r = lsh_params(0.8, 128)
    assert b * r <= 128 and b > 1
    a = minhash("one two three four five six seven eight nine ten", 128, 2)
    same = minhash("one two three four five six seven eight nine ten", 128, 2)
    other = minhash("completely unrelated words appear in this sentence here", 128, 2)
    assert a.jaccard(same) == 1.0 and a.jaccard(other) < 0.2


def test_other_formats_are_read(tmp_path: Path) -> None:
    rows = [
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
        {"instruction": "Translate to French", "input": "good morning", "output": "bonjour"},
        {"instruction": "Translate to German", "input": "good night", "output": "gute Nacht"},
    ]
    src = write_rows(tmp_path / "alpaca.jsonl", rows)
    rep = dedup(src, tmp_path / "o.jsonl")
    assert rep.rows_out == 2 and read_jsonl(tmp_path / "o.jsonl")[1]["output"] == "gute Nacht"


def test_parquet_input(tmp_path: Path) -> None:
    import datasets

    rows = [chat("first question"), chat("first question"), chat("second question")]
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "in.parquet"))
    rep = dedup(tmp_path / "in.parquet", tmp_path / "o.jsonl")
    assert (rep.rows_in, rep.rows_out) == (3, 2)


def test_persistent_redis_index_spans_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """datasketch's Redis storage: rows indexed from one file make near-copies in a later file duplicates.
    Uses a real Redis when TUNELAB_TEST_REDIS_URL is set, else fakeredis standing in for the server."""
    import os

    url = os.environ.get("TUNELAB_TEST_REDIS_URL")
    if url is None:
        fakeredis = pytest.importorskip("fakeredis", reason="needs fakeredis (or TUNELAB_TEST_REDIS_URL)")
        import datasketch.storage as storage

        server = fakeredis.FakeServer()
        monkeypatch.setattr(storage.redis, "Redis", lambda **kw: fakeredis.FakeRedis(server=server))
        url = "redis://localhost:6379/0"
    rng = random.Random(3)
    texts = [sentence(rng) for _ in range(5)]
    first = write_rows(tmp_path / "first.jsonl", [chat(t) for t in texts])
    words = texts[2].split()
    words[-1] = "changed"
    second = write_rows(tmp_path / "second.jsonl", [chat(" ".join(words)), chat(sentence(rng))])
    cfg = DedupConfig(redis_url=url, redis_basename=f"t{rng.random()}", exact=False)
    assert dedup(first, tmp_path / "o1.jsonl", cfg).rows_out == 5
    rep = dedup(second, tmp_path / "o2.jsonl", cfg, tmp_path / "r2.jsonl")
    assert rep.rows_out == 1
    (dropped,) = read_jsonl(tmp_path / "r2.jsonl")
    assert dropped["reason"] == "near_duplicate" and dropped["duplicate_of"] == "first.jsonl:3"


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="file not found"):
        dedup(tmp_path / "nope.jsonl", tmp_path / "o.jsonl")


def test_worker_processes_give_the_same_result(tmp_path: Path) -> None:
    """num_proc=2 runs the signature pass in `datasets` worker processes; the result must not change."""
    from tunelab.data.toolkit.scrub import ScrubConfig, scrub

    src, _ = planted(tmp_path)
    one = dedup(src, tmp_path / "one.jsonl", DedupConfig(num_proc=1), tmp_path / "one.rej.jsonl")
    two = dedup(src, tmp_path / "two.jsonl", DedupConfig(num_proc=2), tmp_path / "two.rej.jsonl")
    assert one.reasons == two.reasons
    assert (tmp_path / "one.jsonl").read_text() == (tmp_path / "two.jsonl").read_text()
    assert (tmp_path / "one.rej.jsonl").read_text() == (tmp_path / "two.rej.jsonl").read_text()
    pii = write_rows(tmp_path / "pii.jsonl", [chat(f"mail user{i}@example.com or call (415) 555-{1000 + i}")
                                              for i in range(40)])
    rep = scrub(pii, tmp_path / "s.jsonl", ScrubConfig(num_proc=2))
    assert rep.details["pii_counts"] == {"EMAIL": 40, "PHONE": 40} and rep.rows_changed == 40
    assert "@" not in (tmp_path / "s.jsonl").read_text()
