"""Label masks fall exactly on assistant tokens (plus their end-of-turn token); packing changes nothing."""

from __future__ import annotations

from typing import Any

import pytest
import tiny
import torch

from tunelab.data.packing import pack, pad
from tunelab.data.records import Conversation, Message
from tunelab.data.templates import IGNORE_INDEX, encode
from tunelab.losses import sft_loss
from tunelab.train.sft import forward_kept_logits


def trained_text(tok: Any, conv: Conversation, **kw: Any) -> str:
    enc = encode(tok, conv, **kw)
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])


CONV = Conversation((
    Message("system", "be brief"),
    Message("user", "first question"),
    Message("assistant", "first answer"),
    Message("user", "second question"),
    Message("assistant", "second answer"),
))


def test_mask_is_exactly_assistant_tokens_and_eot(tok: Any) -> None:
    enc = encode(tok, CONV)
    text = tok.decode(enc.input_ids)
    assert text.count("first answer<|im_end|>") == 1
    assert trained_text(tok, CONV) == "first answer<|im_end|>second answer<|im_end|>"
    # every trained token is inside an assistant turn: the byte tokenizer maps 1 char -> 1 token here
    assert enc.num_trained == len("first answer") + 1 + len("second answer") + 1


def test_train_on_variants_and_weight(tok: Any) -> None:
    assert trained_text(tok, CONV, train_on="last_assistant") == "second answer<|im_end|>"
    assert trained_text(tok, CONV, train_on="all") == tok.decode(encode(tok, CONV).input_ids)
    weighted = Conversation(tuple(m if m.content != "first answer" else Message("assistant", "first answer", weight=0)
                                  for m in CONV.messages))
    assert trained_text(tok, weighted) == "second answer<|im_end|>"


def test_system_prompt_and_truncation(tok: Any) -> None:
    conv = Conversation((Message("user", "q"), Message("assistant", "a")))
    enc = encode(tok, conv, system_prompt="SYS")
    assert tok.decode(enc.input_ids).startswith("<|im_start|>system\nSYS<|im_end|>")
    short = encode(tok, CONV, max_len=20)
    assert short.truncated and len(short.input_ids) == 20 and short.full_length > 20


def test_real_smollm2_template_masks(tok: Any) -> None:
    from tunelab.model.loading import load_tokenizer, resolve_model

    real = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    assert trained_text(real, CONV) == "first answer<|im_end|>second answer<|im_end|>"


def _items(tok: Any, n: int) -> list[Any]:
    rows = tiny.chat_rows(n)
    return [encode(tok, Conversation(tuple(Message(m["role"], m["content"]) for m in r["messages"]))) for r in rows]


def test_packed_loss_equals_padded_loss(tok: Any, model: Any) -> None:
    items = _items(tok, 6)
    packed, padded = pack(items), pad(items, tok.pad_token_id)
    assert packed["targets"].tolist() == padded["targets"].tolist()
    n = packed["targets"].numel()
    with torch.no_grad():
        lp, _ = sft_loss(forward_kept_logits(model, packed), packed["targets"], n)
        lq, _ = sft_loss(forward_kept_logits(model, padded), padded["targets"], n)
        # and each example alone
        singles = sum(
            sft_loss(forward_kept_logits(model, pack([it])), pack([it])["targets"], n)[0] for it in items
        )
    assert abs(lp.item() - lq.item()) < 1e-4
    assert abs(lp.item() - float(singles)) < 1e-4


def test_packing_has_no_cross_example_attention(tok: Any, model: Any) -> None:
    a, b = _items(tok, 2)
    with torch.no_grad():
        alone = forward_kept_logits(model, pack([b]))
        after_a = forward_kept_logits(model, pack([a, b]))[-alone.shape[0]:]
    assert torch.allclose(alone, after_a, atol=1e-5)


def test_row_packing_matches_padded_loss_and_bins_examples(tok: Any, model: Any) -> None:
    from tunelab.data.packing import pack_rows

    items = _items(tok, 7)
    items[2] = encode(tok, Conversation((Message("user", "long " * 20), Message("assistant", "answer " * 10))))
    rows, padded = pack_rows(items, tok.pad_token_id), pad(items, tok.pad_token_id)
    longest = max(len(it.input_ids) for it in items)
    assert rows["input_ids"].shape[1] <= longest and rows["input_ids"].shape[0] < len(items)
    assert int(rows["num_tokens"]) == sum(len(it.input_ids) for it in items)
    assert sorted(rows["targets"].tolist()) == sorted(padded["targets"].tolist())
    n = padded["targets"].numel()
    with torch.no_grad():
        lr, _ = sft_loss(forward_kept_logits(model, rows), rows["targets"], n)
        lq, _ = sft_loss(forward_kept_logits(model, padded), padded["targets"], n)
    assert abs(lr.item() - lq.item()) < 1e-4


def test_row_packing_segments_give_each_sequence_its_own_logps(tok: Any, model: Any) -> None:
    """Preference batches (`pack_rows(segments=True)`): rows hold several sequences in bin-packing order, and
    `segment_ids` maps every target back to its sequence's index in the input list, so per-sequence summed
    log-probs equal those of each sequence scored alone."""
    from tunelab.data.packing import pack_rows
    from tunelab.losses import sequence_logps
    from tunelab.train.dpo import batch_logps

    items = [encode(tok, Conversation((Message("user", "q" * (3 + 5 * i)), Message("assistant", "a" * (2 + 3 * i)))))
             for i in (0, 10, 1, 3, 2)]
    batch = pack_rows(items, int(tok.pad_token_id), segments=True)
    assert batch["input_ids"].shape[0] < len(items) and int(batch["num_sequences"]) == len(items)
    assert sorted(set(batch["segment_ids"].tolist())) == list(range(len(items)))
    with torch.no_grad():
        sums, counts = batch_logps(model, batch)
        for i, it in enumerate(items):
            alone = pack([it])
            want, n = sequence_logps(forward_kept_logits(model, alone), alone["targets"],
                                     torch.zeros(len(alone["targets"]), dtype=torch.long), 1)
            assert float(counts[i]) == float(n[0]) == it.num_trained
            assert float(sums[i]) == pytest.approx(float(want[0]), abs=1e-4)
