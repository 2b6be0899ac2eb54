"""The shared loop on a tiny model: equivalences, learning for every fine-tuning mode, resume, merge, NaN."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tiny
import torch
from safetensors.torch import load_file

from tunelab.config import config_from_dict
from tunelab.errors import TunelabError
from tunelab.train import loop as loop_mod
from tunelab.train.run import train
from tunelab.train.tracking import read_metrics


def make_cfg(tmp_path: Path, model_dir: Path, out: str = "run", n: int = 16, **sections: Any) -> Any:
    train_file = tiny.write_jsonl(tmp_path / "train.jsonl", tiny.chat_rows(n))
    valid_file = tiny.write_jsonl(tmp_path / "valid.jsonl", tiny.chat_rows(10, seed=7))
    raw: dict[str, Any] = {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "finetune": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(train_file), "validation": str(valid_file), "max_seq_len": 128, "min_examples": 1},
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "seed": 3},
        "output_dir": str(tmp_path / out),
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            raw.setdefault(k, {}).update(v)
        else:
            raw[k] = v
    return config_from_dict(raw)


def adapter_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=atol), (k, (a[k] - b[k]).abs().max())


def test_grad_accumulation_equals_big_batch(tmp_path: Path, tiny_dir: Path, monkeypatch: Any) -> None:
    # The property is about gradients: record the gradient each optimizer step sees and compare those. (Adam's
    # first steps move every weight by about lr * sign(g), so a gradient element near zero can flip sign on
    # float rounding between the two summation orders; comparing weights alone would be flaky.)
    grads: list[list[torch.Tensor]] = []
    real_step = torch.optim.AdamW.step

    def recording_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        grads.append([p.grad.detach().clone() for g in self.param_groups for p in g["params"] if p.grad is not None])
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording_step)

    def run(name: str, **kw: Any) -> tuple[list[list[torch.Tensor]], dict[str, torch.Tensor]]:
        grads.clear()
        res = train(make_cfg(tmp_path, tiny_dir, name, **kw))
        return list(grads), adapter_weights(res.run_dir)

    big_g, big_w = run("big", train={"batch_size": 4, "grad_accum": 1, "lr": 1e-3})
    assert len(big_g) == 4 and all(len(step) == len(big_g[0]) > 0 for step in big_g)
    others = {"accumulated 4 x 1": run("acc", train={"batch_size": 1, "grad_accum": 4, "lr": 1e-3}),
              "padded instead of packed": run("pad", data={"packing": False}, train={"lr": 1e-3})}
    for what, (g, w) in others.items():
        assert len(g) == len(big_g), what
        for step, (a_step, b_step) in enumerate(zip(big_g, g, strict=True)):
            for a, b in zip(a_step, b_step, strict=True):
                scale = float(a.abs().max()) + 1e-12
                assert float((a - b).abs().max()) / scale < 1e-4, (what, step)
        assert_same(big_w, w, atol=5e-5)


@pytest.mark.parametrize("mode", ["lora", "dora", "adalora", "qlora", "full"])
def test_loss_falls_when_overfitting(tmp_path: Path, tiny_dir: Path, mode: str) -> None:
    lr = 2e-3 if mode == "full" else 1e-2
    extra: dict[str, Any] = {"finetune": mode, "train": {"max_steps": 30, "lr": lr, "eval_every": 30}}
    if mode == "qlora":
        extra["model"] = {"dtype": "auto"}
    if mode == "adalora":
        extra["lora"] = {"init_r": 8, "target_r": 4}
    res = train(make_cfg(tmp_path, tiny_dir, n=8, **extra))
    rows = [r for r in read_metrics(res.run_dir) if "train_loss" in r]
    first, last = rows[0]["train_loss"], rows[-1]["train_loss"]
    assert last < 0.6 * first, (mode, first, last)
    out = res.run_dir / ("model" if mode == "full" else "adapter")
    assert (out / ("model.safetensors" if mode == "full" else "adapter_model.safetensors")).exists()


def interrupt_before_step(cfg: Any, step: int, monkeypatch: Any) -> None:
    """Train until `step` is about to start, then stop as a kill would (nothing after the last checkpoint saved)."""
    real_step = loop_mod.train_step

    def crash(ctx: Any, mbs: Any) -> Any:
        if ctx.state.step == step - 1:
            raise KeyboardInterrupt
        return real_step(ctx, mbs)

    monkeypatch.setattr(loop_mod, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg)
    monkeypatch.setattr(loop_mod, "train_step", real_step)


def test_resume_after_interruption_matches_uninterrupted(tmp_path: Path, tiny_dir: Path, monkeypatch: Any) -> None:
    settings = {"train": {"max_steps": 6, "save_every": 3, "batch_size": 2}, "lora": {"dropout": 0.1}}
    straight = train(make_cfg(tmp_path, tiny_dir, "straight", **settings))

    cfg = make_cfg(tmp_path, tiny_dir, "interrupted", **settings)
    interrupt_before_step(cfg, 5, monkeypatch)  # step 5 starts after checkpoint 3 and an unsaved step 4
    assert (cfg_dir := Path(cfg.output_dir) / "checkpoints" / "step-000003").exists(), cfg_dir
    with pytest.raises(TunelabError, match="already holds a run"):
        train(cfg)  # never silently overwrite work
    logged = [r["step"] for r in read_metrics(Path(cfg.output_dir)) if "train_loss" in r]
    assert logged == [1, 2, 3, 4]  # step 4 was logged after the last checkpoint (3), as a kill -9 would leave it
    resumed = train(cfg, resume=True)
    assert resumed.state.step == 6
    # The loop says where it picked up: the checkpoint's step and data position (2 examples a step, 16 in all).
    assert resumed.resumed_from is not None
    assert {k: resumed.resumed_from[k] for k in ("step", "epoch", "step_in_epoch")} == {
        "step": 3, "epoch": 0, "step_in_epoch": 3}
    rows = read_metrics(resumed.run_dir)
    assert [r["step"] for r in rows if "train_loss" in r] == [1, 2, 3, 4, 5, 6]  # no step twice
    assert [r["resumed_from"]["step"] for r in rows if "resumed_from" in r] == [3]
    assert_same(adapter_weights(straight.run_dir), adapter_weights(resumed.run_dir), atol=1e-6)


def test_resume_without_optimizer_state_differs(tmp_path: Path, tiny_dir: Path, monkeypatch: Any) -> None:
    """The resume test above would pass trivially if restoring state did nothing: a resume that skips the
    optimizer state (Adam's moments) must end on different weights."""
    settings = {"train": {"max_steps": 6, "save_every": 3, "batch_size": 2}}
    straight = train(make_cfg(tmp_path, tiny_dir, "straight", **settings))
    cfg6 = make_cfg(tmp_path, tiny_dir, "skipped", **settings)
    interrupt_before_step(cfg6, 4, monkeypatch)
    monkeypatch.setattr(torch.optim.AdamW, "load_state_dict", lambda self, sd: None)
    skipped = train(cfg6, resume=True)
    assert skipped.resumed_from is not None and skipped.resumed_from["step"] == 3
    a, b = adapter_weights(straight.run_dir), adapter_weights(skipped.run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4


def test_merged_logits_equal_adapter_logits(tmp_path: Path, tiny_dir: Path) -> None:
    from tunelab.model.adapters import load_for_inference, merge_run
    from tunelab.model.loading import load_model

    res = train(make_cfg(tmp_path, tiny_dir, train={"max_steps": 5}))
    peft_model, _, _ = load_for_inference(str(res.run_dir), dtype="fp32")
    merged_dir = merge_run(str(res.run_dir), tmp_path / "merged", dtype="fp32")
    merged, _ = load_model(str(merged_dir), dtype="fp32")
    base, _ = load_model(str(tiny_dir), dtype="fp32")
    x = torch.randint(0, 250, (2, 20))
    with torch.no_grad():
        a, b, c = peft_model(input_ids=x).logits, merged(input_ids=x).logits, base(input_ids=x).logits
    assert torch.allclose(a, b, atol=1e-4)
    assert not torch.allclose(a, c, atol=1e-3)  # the adapter really changed the model


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path: Path, tiny_dir: Path, monkeypatch: Any) -> None:
    from tunelab.train import sft

    real = sft.SFT.loss
    calls = {"n": 0}

    def poisoned(self: Any, model: Any, batch: Any, num_items: float) -> Any:
        loss, m = real(self, model, batch, num_items)
        if model.training:
            calls["n"] += 1
            if calls["n"] == 4:
                return loss * float("nan"), m
        return loss, m

    monkeypatch.setattr(sft.SFT, "loss", poisoned)
    cfg = make_cfg(tmp_path, tiny_dir, train={"max_steps": 6, "save_every": 2})
    with pytest.raises(TunelabError) as e:
        train(cfg)
    assert e.value.exit_code == 3
    assert "NaN or infinite at step 4" in e.value.message and "step-000002" in e.value.message
    assert (Path(cfg.output_dir) / "checkpoints" / "step-000002" / "adapter").exists()


def test_outputs_and_baseline(tmp_path: Path, tiny_dir: Path) -> None:
    from peft import PeftModel

    from tunelab.model.loading import load_model

    res = train(make_cfg(tmp_path, tiny_dir, train={"max_steps": 3, "eval_every": 1}))
    d = res.run_dir
    for name in ("config.yaml", "manifest.json", "metrics.jsonl", "loss.png", "state.json", "tokenizer", "adapter"):
        assert (d / name).exists(), name
    rows = read_metrics(d)
    base = [r for r in rows if r.get("baseline")]
    assert len(base) == 1 and base[0]["step"] == 0 and "valid_loss" in base[0]
    assert [r["step"] for r in rows if "valid_loss" in r] == [0, 1, 2, 3]
    model, _ = load_model(str(tiny_dir), dtype="fp32")
    PeftModel.from_pretrained(model, str(d / "adapter"))  # standard PEFT format


def test_early_stopping_keeps_best(tmp_path: Path, tiny_dir: Path) -> None:
    # Train on 4 examples for many steps at a high LR: validation loss turns up while training loss falls.
    cfg = make_cfg(tmp_path, tiny_dir, n=4, lora={"r": 16, "alpha": 64},
                   train={"max_steps": 80, "lr": 5e-2, "eval_every": 2, "early_stopping": True, "patience": 2})
    res = train(cfg)
    st = res.state
    assert st.stopped_early and st.best_step is not None and st.step < 80
    valid = {r["step"]: r["valid_loss"] for r in read_metrics(res.run_dir) if "valid_loss" in r}
    assert valid[st.best_step] == min(valid.values())
    assert_same(adapter_weights(res.run_dir), load_file(str(res.run_dir / "best" / "adapter" / "adapter_model.safetensors")),
                atol=0)


def test_on_checkpoint_sees_every_checkpoint_before_rotation(tmp_path: Path, tiny_dir: Path) -> None:
    # The jobs API keeps every checkpoint servable while the loop itself keeps only the last one: the hook runs
    # while each checkpoint still exists, whatever the rotation does next.
    seen: list[tuple[str, bool]] = []
    res = train(make_cfg(tmp_path, tiny_dir, train={"max_steps": 4, "save_every": 1, "keep_checkpoints": 1}),
                on_checkpoint=lambda p: seen.append((p.name, (p / "adapter" / "adapter_config.json").exists())))
    # (the last step is the run's own `adapter`, not a checkpoint)
    assert seen == [(f"step-{s:06d}", True) for s in (1, 2, 3)]
    assert [p.name for p in (res.run_dir / "checkpoints").iterdir()] == ["step-000003"]
