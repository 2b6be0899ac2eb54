"""The chunked LM head + cross-entropy (`linear_cross_entropy`, SFT's default) against the reference
`sft_loss(hidden @ W.T)`: the same loss, metrics and gradients of the hidden states and of the head's weight,
by hand on a 2-token case and on random cases for every chunk size; the same training losses on the tiny
model; the reference path for heads that are more than a linear layer; LoRA dropout 0 draws no masks."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
import torch.nn.functional as F
from test_training import make_cfg

from tunelab.config import LoraConfig
from tunelab.losses import IGNORE_INDEX, linear_cross_entropy, linear_logps, sft_loss, token_logps
from tunelab.train.run import train
from tunelab.train.sft import plain_lm_head
from tunelab.train.tracking import read_metrics


def test_by_hand_two_tokens_three_words() -> None:
    """h = I (2x2), W rows e0, e1, 0 -> logits [1,0,0] and [0,1,0]; targets 0 and 1, then 2 and ignored.

    Each trained token's loss is log(e + 2) - 1 when the target is its own axis and log(e + 2) - 0 for word 2;
    d loss / d logits = (softmax - onehot) / num_items, softmax = [e, 1, 1] / (e + 2);
    d loss / d h = d logits @ W, d loss / d W = d logits^T @ h."""
    h = torch.eye(2, requires_grad=True)
    w = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]], requires_grad=True)
    e = math.e
    z = e + 2
    loss, m = linear_cross_entropy(h, w, torch.tensor([0, 1]), num_items=2.0, chunk=1)
    assert loss.item() == pytest.approx(math.log(z) - 1, rel=1e-6)
    assert m == {"loss_sum": pytest.approx(2 * (math.log(z) - 1), rel=1e-6), "tokens": 2, "correct": 2.0}
    loss.backward()
    d0 = torch.tensor([e / z - 1, 1 / z, 1 / z]) / 2  # row 0 of d loss / d logits
    d1 = torch.tensor([1 / z, e / z - 1, 1 / z]) / 2
    assert torch.allclose(h.grad, torch.stack([d0[:2], d1[:2]]), atol=1e-7)
    assert torch.allclose(w.grad, torch.stack([d0, d1]).t(), atol=1e-7)

    h.grad = w.grad = None
    loss, m = linear_cross_entropy(h, w, torch.tensor([2, IGNORE_INDEX]), num_items=1.0, chunk=5)
    assert loss.item() == pytest.approx(math.log(z), rel=1e-6)
    assert m["tokens"] == 1 and m["correct"] == 0.0
    loss.backward()
    assert torch.allclose(h.grad, torch.tensor([[e / z, 1 / z], [0.0, 0.0]]), atol=1e-7)


def _reference(h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, n: float) -> tuple[Any, ...]:
    loss, m = sft_loss(F.linear(h, w), t, n)
    loss.backward()
    return loss.item(), m


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
def test_equals_reference_fp32(chunk: int) -> None:
    g = torch.Generator().manual_seed(chunk)
    n, hid, vocab = 37, 16, 50
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::4] = IGNORE_INDEX
    h0, w0 = torch.randn(n, hid, generator=g), torch.randn(vocab, hid, generator=g)
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    want, wm = _reference(h1, w1, t, 23.0)
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_()
    loss, m = linear_cross_entropy(h2, w2, t, 23.0, chunk)
    loss.backward()
    assert loss.item() == pytest.approx(want, rel=1e-6)
    assert m["tokens"] == wm["tokens"] and m["correct"] == wm["correct"]
    assert m["loss_sum"] == pytest.approx(wm["loss_sum"], rel=1e-6)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-6) and torch.allclose(w2.grad, w1.grad, atol=1e-6)


def test_equals_reference_under_bf16_autocast() -> None:
    """Logits in bf16 (the autocast dtype), loss in fp32, as the reference computes them."""
    g = torch.Generator().manual_seed(0)
    t = torch.randint(0, 50, (29,), generator=g)
    h0, w = torch.randn(29, 16, generator=g).bfloat16(), torch.randn(50, 16, generator=g).bfloat16()
    out = []
    for fused in (False, True):
        h = h0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = linear_cross_entropy(h, w, t, 29.0, 8) if fused else sft_loss(F.linear(h, w), t, 29.0)
        loss.backward()
        assert h.grad is not None and h.grad.dtype == torch.bfloat16
        out.append((loss.item(), h.grad.float()))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6)
    assert torch.allclose(out[1][1], out[0][1], atol=1e-3 * float(out[0][1].abs().max()))


def test_no_gradients_without_grad_mode() -> None:
    h = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        loss, m = linear_cross_entropy(h, torch.randn(9, 4), torch.tensor([1, 2, 3, 4, 5]), 5.0, 2)
    assert not loss.requires_grad and m["tokens"] == 5


def test_logps_by_hand_two_tokens_three_words() -> None:
    """h = I (2x2), W rows e0, e1, 0 -> logits [1,0,0] and [0,1,0], softmax [e,1,1]/(e+2) and [1,e,1]/(e+2).

    log-probs of targets 0 and 2: 1 - log(e+2) and 0 - log(e+2); d logp_t / d h_t = (onehot(y_t) - softmax_t) @ W,
    so with an incoming gradient g = (2, -1): row 0 = 2 * (1 - e/z, -1/z), row 1 = -(-1/z, -e/z).
    An ignored target scores 0 and gets no gradient."""
    e = math.e
    z = e + 2
    w0 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]])
    for chunk in (1, 5):
        h = torch.eye(2, requires_grad=True)
        lp = linear_logps(h, w0, torch.tensor([0, 2]), chunk)
        assert lp.tolist() == pytest.approx([1 - math.log(z), -math.log(z)], rel=1e-6)
        (lp * torch.tensor([2.0, -1.0])).sum().backward()
        assert torch.allclose(h.grad, torch.tensor([[2 * (1 - e / z), -2 / z], [1 / z, e / z]]), atol=1e-6)
    h = torch.eye(2, requires_grad=True)
    lp = linear_logps(h, w0, torch.tensor([IGNORE_INDEX, 1]), 1)
    assert lp[0].item() == 0.0
    lp.sum().backward()
    assert h.grad[0].abs().sum().item() == 0.0


@pytest.mark.parametrize("chunk", [1, 7, 64, 10_000])
@pytest.mark.parametrize("head_trains", [False, True])
def test_logps_equal_reference_fp32(chunk: int, head_trains: bool) -> None:
    """Values and gradients (of the hidden states; of the head too when it trains, the recompute path) match
    `token_logps(hidden @ W.T)` under a non-uniform incoming gradient, as DPO's loss gives."""
    g = torch.Generator().manual_seed(chunk)
    n, hid, vocab = 37, 16, 50
    t = torch.randint(0, vocab, (n,), generator=g)
    t[::4] = IGNORE_INDEX
    h0, w0, up = torch.randn(n, hid, generator=g), torch.randn(vocab, hid, generator=g), torch.randn(n, generator=g)
    h1, w1 = h0.clone().requires_grad_(), w0.clone().requires_grad_(head_trains)
    want = token_logps(F.linear(h1, w1), t)
    (want * up).sum().backward()
    h2, w2 = h0.clone().requires_grad_(), w0.clone().requires_grad_(head_trains)
    got = linear_logps(h2, w2, t, chunk)
    (got * up).sum().backward()
    assert torch.allclose(got, want, atol=1e-5)
    assert torch.allclose(h2.grad, h1.grad, atol=1e-5)
    if head_trains:
        assert torch.allclose(w2.grad, w1.grad, atol=1e-5)
    else:
        assert w2.grad is None


def test_logps_equal_reference_under_bf16_autocast() -> None:
    g = torch.Generator().manual_seed(1)
    t = torch.randint(0, 50, (29,), generator=g)
    h0, w = torch.randn(29, 16, generator=g).bfloat16(), torch.randn(50, 16, generator=g).bfloat16()
    out = []
    for fused in (False, True):
        h = h0.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            lp = linear_logps(h, w, t, 8) if fused else token_logps(F.linear(h, w), t)
        assert lp.dtype == torch.float32
        lp.sum().backward()
        assert h.grad is not None and h.grad.dtype == torch.bfloat16
        out.append((lp.detach(), h.grad.float()))
    assert torch.allclose(out[1][0], out[0][0], atol=1e-4)
    assert torch.allclose(out[1][1], out[0][1], atol=1e-2 * float(out[0][1].abs().max()))


def test_logps_keep_nothing_without_grad_mode() -> None:
    h = torch.randn(5, 4, requires_grad=True)
    with torch.no_grad():
        lp = linear_logps(h, torch.randn(9, 4), torch.tensor([1, 2, 3, 4, IGNORE_INDEX]), 2)
    assert not lp.requires_grad and lp[4].item() == 0.0


def _losses(run_dir: Path) -> list[float]:
    return [float(r["train_loss"]) for r in read_metrics(run_dir) if "train_loss" in r]


def test_training_losses_equal_with_and_without_chunks(tmp_path: Path, tiny_dir: Path) -> None:
    """Same seeded run with the reference loss (loss_chunk 0) and chunks of 5 positions: same losses, weights."""
    runs = {c: train(make_cfg(tmp_path, tiny_dir, f"chunk{c}", train={"loss_chunk": c, "max_steps": 4}))
            for c in (0, 5)}
    a, b = _losses(runs[0].run_dir), _losses(runs[5].run_dir)
    assert len(a) == 4 and a == pytest.approx(b, rel=1e-5)
    assert runs[0].final_valid["loss"] == pytest.approx(runs[5].final_valid["loss"], rel=1e-5)


def test_reference_path_for_heads_that_are_not_plain(tok: Any) -> None:
    """A soft-capping head (Gemma 2: logits = 30 tanh(logits / 30)) fails the probe; a Llama head passes."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    batch = {"input_ids": torch.randint(0, 200, (1, 12)), "position_ids": torch.arange(12)[None]}
    assert plain_lm_head(tiny.tiny_model(), batch) is not None
    torch.manual_seed(0)
    gemma = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, final_logit_softcapping=0.5, initializer_range=0.5))
    assert plain_lm_head(gemma, batch) is None


def test_lora_dropout_defaults_to_zero_and_draws_no_mask() -> None:
    """p = 0 is PEFT's nn.Identity: no Bernoulli mask, no extra multiply (measured: docs/benchmarks.md)."""
    from tunelab.model.adapters import apply_finetune

    assert LoraConfig().dropout == 0.0
    pm = apply_finetune(tiny.tiny_model(), "lora", LoraConfig(r=4))
    drops = [m for n, m in pm.named_modules() if n.endswith("lora_dropout.default")]
    assert drops and all(isinstance(d, torch.nn.Identity) for d in drops)
    with torch.profiler.profile() as prof:
        pm(input_ids=torch.randint(0, 200, (1, 16))).logits.sum().backward()
    assert not any("bernoulli" in e.key for e in prof.key_averages())


def test_compiled_chunks_equal_eager() -> None:
    """train.compile's loss path (each chunk through torch.compile) against the eager one, gradients included."""
    g = torch.Generator().manual_seed(3)
    t = torch.randint(0, 50, (21,), generator=g)
    t[::3] = IGNORE_INDEX
    h0, w0 = torch.randn(21, 16, generator=g), torch.randn(50, 16, generator=g)
    out = []
    for compiled in (False, True):
        h, w = h0.clone().requires_grad_(), w0.clone().requires_grad_()
        loss, m = linear_cross_entropy(h, w, t, 9.0, 8, compiled=compiled)
        loss.backward()
        out.append((loss.item(), m, h.grad, w.grad))
    assert out[1][0] == pytest.approx(out[0][0], rel=1e-6) and out[1][1]["correct"] == out[0][1]["correct"]
    assert torch.allclose(out[1][2], out[0][2], atol=1e-6) and torch.allclose(out[1][3], out[0][3], atol=1e-6)


def test_decoder_layers_found_under_peft() -> None:
    from tunelab.model.adapters import apply_finetune
    from tunelab.train.fastpath import decoder_layers

    pm = apply_finetune(tiny.tiny_model(), "lora", LoraConfig(r=4))
    assert len(decoder_layers(pm)) == 2
    assert decoder_layers(torch.nn.Linear(2, 2)) == []


@pytest.mark.slow
def test_compiled_training_equals_eager_in_fp32(tmp_path: Path, tiny_dir: Path) -> None:
    """train.compile changes no result in fp32 (bf16 rounds differently where inductor fuses ops)."""
    runs = {c: train(make_cfg(tmp_path, tiny_dir, f"compile{c}", train={"compile": c, "max_steps": 3}))
            for c in (False, True)}
    assert _losses(runs[True].run_dir) == pytest.approx(_losses(runs[False].run_dir), rel=1e-5)


def test_lora_input_casts_skipped_under_autocast_change_nothing(tok: Any, tmp_path: Path, tiny_dir: Path) -> None:
    """PEFT casts each LoRA input to the fp32 adapter dtype, which autocast casts straight back to bf16: SFT
    skips that cast under autocast. Same loss, same gradients, bit for bit; fewer copies."""
    from tunelab.data.packing import pack_rows
    from tunelab.data.records import Conversation, Message
    from tunelab.data.templates import encode
    from tunelab.model.adapters import apply_finetune
    from tunelab.train.sft import SFT

    pm = apply_finetune(tiny.tiny_model(dtype=torch.bfloat16), "lora", LoraConfig(r=4))
    g = torch.Generator().manual_seed(0)
    for n, p in pm.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1, generator=g)
    items = [encode(tok, Conversation((Message("user", f"q {i} " * (i + 1)), Message("assistant", f"a {i} " * 3))))
             for i in range(4)]
    batch = pack_rows(items, int(tok.pad_token_id))
    out = []
    for finetune in ("lora", "dora"):  # the skip applies to plain LoRA only: "dora" keeps PEFT's casts here
        method = SFT(make_cfg(tmp_path, tiny_dir, finetune=finetune), tok)
        pm.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = method.loss(pm, batch, 10.0)
        loss.backward()
        out.append((loss.item(), [p.grad.clone() for p in pm.parameters() if p.grad is not None]))
    assert out[0][0] == out[1][0] and len(out[0][1]) > 0
    assert all(torch.equal(a, b) for a, b in zip(out[0][1], out[1][1], strict=True))
