"""filter: planted bad rows (too short, too long, repetitive, foreign, gibberish) are dropped with their
reason; scores are kept; rows in = rows out + rows rejected."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from toolkit_helpers import assert_accounted, chat, write_rows

from tunelab.data.toolkit.filter import (
    FilterConfig,
    detect_language,
    perplexities,
    quality_filter,
    repetition_ratio,
)

CLEAN = [
    chat(f"Please tell me about the {c} {a} in the garden today.", f"The {c} {a} is in the garden today, resting.")
    for c in ("red", "blue", "green", "brown", "small", "big")
    for a in ("cat", "dog", "bird")
]


def trained_model(texts: list[str], tok: Any, steps: int = 30) -> Any:
    """A tiny model trained for a few steps on the clean texts, so it finds gibberish surprising."""
    model = tiny.tiny_model(seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(x) for x in ids)
    batch = torch.full((len(ids), width), tok.pad_token_id)
    labels = torch.full((len(ids), width), -100)
    for i, x in enumerate(ids):
        batch[i, : len(x)] = torch.tensor(x)
        labels[i, : len(x)] = torch.tensor(x)
    for _ in range(steps):
        loss = model(input_ids=batch, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    return model.eval()


def test_scores() -> None:
    assert repetition_ratio("the cat sat on the mat") == 0.0
    assert repetition_ratio("buy now " * 30) > 0.9
    assert detect_language("This is a plain English sentence about the weather and the garden.")[0] == "en"
    assert detect_language("Dies ist ein ganz normaler deutscher Satz über das Wetter und den Garten.")[0] == "de"
    assert detect_language("hi") == ("und", 0.0)


def test_planted_bad_rows_are_dropped(tmp_path: Path) -> None:
    rows: list[object] = list(CLEAN)
    rows += [
        chat("ok", "k"),                                              # too short
        chat("Tell me a story.", "Once upon a time there was a garden. " * 40),  # too long
        chat("Say it.", "buy now buy now buy now " * 8),              # repetitive
        chat("Pouvez-vous m'aider avec ma commande, s'il vous plaît?", "Bien sûr, je vérifie votre commande."),
        "[1, 2, 3]",                                                   # not an object
    ]
    src = write_rows(tmp_path / "in.jsonl", rows)
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    cfg = FilterConfig(min_tokens=10, max_tokens=600, max_repetition=0.5, languages=["en"])
    rep = quality_filter(src, out, cfg, rej, tokenizer=tiny.tiny_tokenizer())
    kept, dropped = assert_accounted(len(rows), out, rej)
    n = len(CLEAN)
    assert {r["line"]: r["reason"] for r in dropped} == {
        n + 1: "too_short", n + 2: "too_long", n + 3: "repetitive", n + 4: "language", n + 5: "not_an_object"}
    assert len(kept) == n and rep.rows_out == n
    q = kept[0]["metadata"]["quality"]
    assert q["lang"] == "en" and q["tokens"] == len(
        CLEAN[0]["messages"][0]["content"] + "\n" + CLEAN[0]["messages"][1]["content"])
    assert q["repetition"] < 0.5 and q["perplexity"] is None
    assert next(r for r in dropped if r["reason"] == "language")["scores"]["lang"] == "fr"


def test_perplexity_drops_the_worst_fraction(tmp_path: Path) -> None:
    rng = random.Random(0)
    gibberish = "".join(rng.choice("QXZJKV#%&*@!~^0987") for _ in range(40))
    clean = CLEAN[:6]
    rows = [*clean[:3], chat(gibberish, gibberish[::-1]), *clean[3:]]
    src = write_rows(tmp_path / "in.jsonl", rows)
    tok = tiny.tiny_tokenizer()
    model = trained_model([f"{r['messages'][0]['content']}\n{r['messages'][1]['content']}" for r in clean], tok)
    out, rej = tmp_path / "out.jsonl", tmp_path / "rej.jsonl"
    rep = quality_filter(src, out, FilterConfig(ppl_drop_fraction=0.1), rej, model=model, tokenizer=tok)
    kept, dropped = assert_accounted(len(rows), out, rej)
    assert [(r["line"], r["reason"]) for r in dropped] == [(4, "perplexity")]
    assert dropped[0]["scores"]["perplexity"] > max(r["metadata"]["quality"]["perplexity"] for r in kept)
    assert rep.details["ppl_threshold"] == pytest.approx(dropped[0]["scores"]["perplexity"], rel=1e-3)


def test_scores_off_keeps_rows_unchanged(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", CLEAN[:3])
    quality_filter(src, tmp_path / "o.jsonl", FilterConfig(keep_scores=False, max_repetition=0.5))
    assert (tmp_path / "o.jsonl").read_text() == src.read_text()


def test_word_counts_without_tokenizer(tmp_path: Path) -> None:
    src = write_rows(tmp_path / "in.jsonl", [chat("one two", "three"), chat("a b c d e f", "g h i j")])
    rep = quality_filter(src, tmp_path / "o.jsonl", FilterConfig(min_tokens=5, tokenizer="words"))
    assert rep.rows_out == 1 and rep.reasons == {"too_short": 1}


def test_perplexity_is_lower_for_trained_text() -> None:
    tok = tiny.tiny_tokenizer()
    texts = ["the cat sat on the mat"] * 4
    model = trained_model(texts, tok, steps=30)
    clean, noise = perplexities(["the cat sat on the mat", "#Q%Z&X*J@K!V~"], model, tok)
    assert clean < noise


@pytest.mark.slow
def test_default_reference_model_is_the_base_model(tmp_path: Path) -> None:
    """End to end with the real SmolLM2-135M: word salad has the worst perplexity among plain sentences."""
    rows = [
        chat("What is the capital of France?", "The capital of France is Paris."),
        chat("How many days are in a week?", "A week has seven days."),
        chat("purple seventeen quickly the of banana sideways", "under cloud mathematics jumping of the spoon"),
        chat("What colour is the sky on a clear day?", "On a clear day the sky is blue."),
    ]
    src = write_rows(tmp_path / "in.jsonl", rows)
    rep = quality_filter(src, tmp_path / "o.jsonl", FilterConfig(ppl_drop_fraction=0.25, min_tokens=5),
                         tmp_path / "r.jsonl")
    kept, dropped = assert_accounted(4, tmp_path / "o.jsonl", tmp_path / "r.jsonl")
    assert [(r["line"], r["reason"]) for r in dropped] == [(3, "perplexity")]
    assert rep.details["tokenizer"] != "words" and kept[0]["metadata"]["quality"]["tokens"] < 20
