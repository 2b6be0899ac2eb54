"""scrub: every PII type on planted examples, checksums reject look-alikes, no hits on a clean control text,
the audit file and the logs never contain the PII."""

from __future__ import annotations

from pathlib import Path

import pytest
from toolkit_helpers import assert_accounted, chat, read_jsonl, write_rows

from tunelab.data.readers import read_conversations
from tunelab.data.toolkit.scrub import ScrubConfig, find_pii, iban_ok, luhn_ok, scrub, scrub_text

PLANTED = {
    "EMAIL": ["write to jane.doe+billing@example.co.uk today", "ops@corp-mail.io"],
    "PHONE": ["call (415) 555-2671 now", "ring +44 20 7946 0958 please", "phone 212-555-0187."],
    "CREDIT_CARD": ["card 4111 1111 1111 1111 exp 09/27", "paid with 5500-0000-0000-0004"],
    "SSN": ["my ssn is 123-45-6789."],
    "IP_ADDRESS": ["server 192.168.10.4 is down", "v6 host 2001:db8::8a2e:370:7334 answered"],
    "IBAN": ["send to GB82 WEST 1234 5698 7654 32 today", "IBAN DE89370400440532013000"],
    "URL": ["see https://example.com/account?id=42.", "or www.example.org/help"],
    "PERSON": ["Dr. Alice Walker signed it", "my name is Bob Marley", "ask Sarah Connor about it"],
}

CLEAN = (
    "The meeting is at 10:30 on 2024-05-17 in room 4B. Version 3.11.7 fixed 42 bugs and pi is 3.14159. "
    "Order 12345 shipped in 3 boxes of 24 items; the ratio was 1:2:3 and the final score 98-87. "
    "Call the function with x=5 and y=10. Paris is the capital of France. I bought 1000 shares at $12.50 "
    "and the invoice total came to 1,234,567.89 dollars. Chapter 7, section 2.3.1 explains the proof."
)


@pytest.mark.parametrize("kind", sorted(PLANTED))
def test_every_type_is_found_and_replaced(kind: str) -> None:
    for text in PLANTED[kind]:
        spans = find_pii(text)
        assert [k for _, _, k in spans] == [kind], (text, spans)
        out = scrub_text(text)
        assert f"<{kind}>" in out
        s, e, _ = spans[0]
        assert text[s:e] not in out


def test_clean_control_text_has_no_hits() -> None:
    assert find_pii(CLEAN) == []
    assert scrub_text(CLEAN) == CLEAN


def test_checksums_reject_look_alikes() -> None:
    assert luhn_ok("4111111111111111") and not luhn_ok("4111111111111112")
    assert iban_ok("GB82 WEST 1234 5698 7654 32") and not iban_ok("GB82 WEST 1234 5698 7654 33")
    bad = "card 4111 1111 1111 1112, iban GB82 WEST 1234 5698 7654 33, ssn 666-12-3456, ip 999.1.1.1"
    assert find_pii(bad) == []


def test_types_can_be_limited() -> None:
    text = "mail a@b.com or call (415) 555-2671"
    assert scrub_text(text, types=["EMAIL"]) == "mail <EMAIL> or call (415) 555-2671"


def test_file_scrub_audits_changes_without_leaking(tmp_path: Path) -> None:
    rows = [
        chat("My email is jane.doe@example.com and my card is 4111 1111 1111 1111", "Thanks, noted."),
        chat(CLEAN, "Fine."),
        chat("Call me at (415) 555-2671", "Will do, calling 415-555-2671."),
        "broken line",
    ]
    src = write_rows(tmp_path / "in.jsonl", rows)
    out, audit = tmp_path / "out.jsonl", tmp_path / "audit.jsonl"
    rep = scrub(src, out, ScrubConfig(), audit)
    kept, dropped = assert_accounted(4, out, audit)
    assert len(kept) == 3 and dropped[0]["reason"] == "invalid_json"
    assert rep.rows_changed == 2
    assert rep.details["pii_counts"] == {"EMAIL": 1, "CREDIT_CARD": 1, "PHONE": 2}
    assert kept[0]["messages"][0]["content"] == "My email is <EMAIL> and my card is <CREDIT_CARD>"
    assert kept[1] == rows[1]
    assert kept[2]["messages"][1]["content"] == "Will do, calling <PHONE>."
    audit_text = audit.read_text()
    for secret in ("jane.doe@example.com", "4111 1111", "555-2671"):
        assert secret not in audit_text and secret not in out.read_text()
    changed = [r for r in read_jsonl(audit) if r["reason"] == "pii_replaced"]
    assert [r["line"] for r in changed] == [1, 3] and changed[0]["pii"] == {"EMAIL": 1, "CREDIT_CARD": 1}
    # the scrubbed file is still valid training data for the readers
    assert len(read_conversations(out)) == 3


def test_presidio_engine_without_presidio_is_a_clear_error(tmp_path: Path) -> None:
    pytest.importorskip("tunelab")
    try:
        import presidio_analyzer  # noqa: F401

        pytest.skip("presidio-analyzer is installed here")
    except ImportError:
        pass
    from tunelab.errors import TunelabError

    src = write_rows(tmp_path / "in.jsonl", [chat("hello")])
    with pytest.raises(TunelabError, match="presidio"):
        scrub(src, tmp_path / "o.jsonl", ScrubConfig(engine="presidio"))
