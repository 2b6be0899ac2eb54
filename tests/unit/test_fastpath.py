"""The training fast path (tunelab/train/fastpath.py).

Packed attention: one causal SDPA call per packed example gives the logits and gradients of transformers'
masked whole-row SDPA, for rows of one or many segments (GQA model), falls back to the mask for crowded rows,
and leaves every other call (generation with a KV cache, padded batches) as SDPA. Training switches to it by
default and saves no trace of it in the model's config.

Lean activations: RMSNorm and the SiLU-gated MLP give transformers' outputs and gradients (weights' too, for
full fine-tuning) and keep fewer bytes for backward; modules that are not exactly Llama's are left alone."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from test_training import make_cfg

from tunelab.data.packing import pack_rows
from tunelab.data.records import Conversation, Message
from tunelab.data.templates import encode
from tunelab.train import fastpath
from tunelab.train.run import train
from tunelab.train.sft import forward_kept_logits


def _items(tok: Any, sizes: list[int]) -> list[Any]:
    return [encode(tok, Conversation((Message("user", "q" * n), Message("assistant", "a" * (n // 2 + 1)))))
            for n in sizes]


def test_segment_lengths_restart_at_zero() -> None:
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 4, 5]])
    assert fastpath.segment_lengths(pos) == [[3, 2, 1], [6]]


@pytest.mark.parametrize("sizes", [[60], [40, 7, 9, 3], [50] + [1] * 20])
def test_same_logits_and_gradients_as_masked_sdpa(tok: Any, sizes: list[int]) -> None:
    """[50] + 20 x [1]: a row of more than MASKED_ABOVE segments takes the masked path for that row."""
    batch = pack_rows(_items(tok, sizes), int(tok.pad_token_id))
    out = []
    for packed in (False, True):
        model = tiny.tiny_model()
        assert model.config._attn_implementation == "sdpa"
        if packed:
            assert fastpath.use_packed_attention(model)
        logits = forward_kept_logits(model, batch)
        logits.float().pow(2).mean().backward()
        out.append((logits.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(out[0][0], out[1][0], atol=1e-5)
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(out[0][1], out[1][1], strict=True))


def test_calls_per_segment(tok: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bool, int]] = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q: torch.Tensor, *a: Any, **kw: Any) -> torch.Tensor:
        calls.append((bool(kw.get("is_causal")), q.shape[2]))
        return real(q, *a, **kw)

    model = tiny.tiny_model()
    fastpath.use_packed_attention(model)
    batch = pack_rows(_items(tok, [40, 7, 9]), int(tok.pad_token_id))
    monkeypatch.setattr(fastpath.F, "scaled_dot_product_attention", spy)
    with torch.no_grad():
        forward_kept_logits(model, batch)
    lens = [n for row in fastpath.segment_lengths(batch["position_ids"]) for n in row]
    assert calls == [(True, n) for n in lens] * model.config.num_hidden_layers


def test_generation_is_unchanged(tok: Any) -> None:
    """Left-padded prompts with a KV cache never see the segment lengths: plain SDPA, the same tokens."""
    prompts = [tok("hello there", return_tensors="pt").input_ids[0], tok("hi", return_tensors="pt").input_ids[0]]
    width = max(len(p) for p in prompts)
    ids = torch.full((2, width), int(tok.pad_token_id))
    mask = torch.zeros((2, width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = p, 1
    outs = []
    for packed in (False, True):
        model = tiny.tiny_model()
        if packed:
            fastpath.use_packed_attention(model)
        outs.append(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=int(tok.pad_token_id)))
    assert torch.equal(outs[0], outs[1])


def test_training_uses_it_and_saves_no_trace(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A seeded full fine-tune on packed attention and the same run on the masked whole-row path: the same
    losses; no saved config.json names the tunelab attention."""
    from tunelab.train.tracking import read_metrics

    used: list[bool] = []
    real = fastpath.use_packed_attention

    def record(model: Any) -> bool:
        used.append(real(model))
        return used[-1]

    monkeypatch.setattr(fastpath, "use_packed_attention", record)
    packed = train(make_cfg(tmp_path, tiny_dir, "packed", finetune="full", train={"max_steps": 3}))
    monkeypatch.setattr(fastpath, "use_packed_attention", lambda model: False)
    masked = train(make_cfg(tmp_path, tiny_dir, "masked", finetune="full", train={"max_steps": 3}))
    assert used == [True]
    a, b = ([float(r["train_loss"]) for r in read_metrics(res.run_dir) if "train_loss" in r] for res in (packed, masked))
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-5)
    configs = list(packed.run_dir.rglob("config.json"))
    assert configs and all(fastpath.PACKED not in c.read_text() for c in configs)


def _saved_bytes(fn: Any) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lean_activations_same_results_less_kept(tok: Any, dtype: torch.dtype) -> None:
    batch = pack_rows(_items(tok, [30, 12, 9]), int(tok.pad_token_id))
    out, kept = [], []
    for lean in (False, True):
        model = tiny.tiny_model(dtype=dtype)
        if lean:
            assert fastpath.use_lean_activations(model) == 3 * model.config.num_hidden_layers + 1
        x = model.model.embed_tokens(batch["input_ids"]).detach().requires_grad_()

        def run(m: Any = model, h: torch.Tensor = x) -> torch.Tensor:
            y = h
            for layer in m.model.layers:
                y = layer.mlp(layer.post_attention_layernorm(y)) + layer.input_layernorm(y)
            return m.model.norm(y)

        kept.append(_saved_bytes(run))
        y = run()
        # not y.pow(2).sum(): through the final norm that is scale-invariant, and its gradient ~0 (noise)
        (y.float() * torch.randn(y.shape, generator=torch.Generator().manual_seed(0))).sum().backward()
        out.append((y.detach().float(), x.grad.float(), [p.grad.float() for p in model.parameters() if p.grad is not None]))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert torch.allclose(out[0][0], out[1][0], atol=tol, rtol=tol)
    scale = float(out[0][1].abs().max())
    assert torch.allclose(out[0][1], out[1][1], atol=tol * scale, rtol=tol)
    assert len(out[0][2]) == len(out[1][2]) > 0  # norm and MLP weights train here (full fine-tuning)
    for a, b in zip(out[0][2], out[1][2], strict=True):
        assert torch.allclose(a, b, atol=tol * float(a.abs().max()), rtol=tol)
    assert kept[1] < 0.8 * kept[0], kept


def test_lean_activations_leave_other_modules_alone() -> None:
    from transformers import Gemma2Config, Gemma2ForCausalLM

    gemma = Gemma2ForCausalLM(Gemma2Config(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, head_dim=16))
    assert fastpath.use_lean_activations(gemma) == 0


def test_lean_functions_pass_gradcheck() -> None:
    """In fp64, against finite differences: RMSNorm's input and weight gradients, SiLU-gate's two inputs."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, dtype=torch.float64, generator=g).requires_grad_()
    w = (1 + 0.1 * torch.randn(16, dtype=torch.float64, generator=g)).requires_grad_()
    assert torch.autograd.gradcheck(lambda h, ww: fastpath._RMSNorm.apply(h, ww, 1e-6), (x, w))
    gate = torch.randn(3, 16, dtype=torch.float64, generator=g).requires_grad_()
    up = torch.randn(3, 16, dtype=torch.float64, generator=g).requires_grad_()
    assert torch.autograd.gradcheck(fastpath._SiLUMul.apply, (gate, up))
