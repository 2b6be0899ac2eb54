"""The loop's RL-facing parts without training: the validation metric's direction for best step and early
stopping, old saved states, step hooks, and the rollout phase's re-padding (Experience.cat / select)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tunelab.config import config_from_dict
from tunelab.train import loop as loop_mod
from tunelab.train.hooks import AdaLoraRankStep, finetune_hooks
from tunelab.train.loop import LoopState, after_eval
from tunelab.train.rollout import Experience, Rollout, completion_forward


def fake_ctx(higher: bool, *, early_stopping: bool = False, patience: int = 2) -> Any:
    metric = "reward" if higher else "loss"
    logged: list[dict[str, Any]] = []
    return SimpleNamespace(
        state=LoopState(), method=SimpleNamespace(valid_metric=metric, higher_is_better=higher),
        cfg=SimpleNamespace(train=SimpleNamespace(early_stopping=early_stopping, patience=patience)),
        last_valid={}, console=None, is_main=True, tracker=SimpleNamespace(log=logged.append, rows=logged),
        gathered_weights=lambda: None, unwrap=lambda: None, run_dir=Path("unused"), weights_name="adapter",
    )


def run_evals(ctx: Any, valid: list[float], train: list[float]) -> list[bool]:
    key = ctx.method.valid_metric
    out = []
    for step, (v, t) in enumerate(zip(valid, train, strict=True), start=1):
        ctx.state.step, ctx.state.last_train_metric = step, t
        out.append(after_eval(ctx, {key: v}))
    return out


def test_reward_best_step_is_the_highest() -> None:
    """Validation rewards 0.2, 0.6, 0.4, 0.5: the best is 0.6 at step 2 (a loss-shaped loop would pick 0.2 at
    step 1, which is what GRPO used to report as "best validation loss -0.45" on negated rewards)."""
    ctx = fake_ctx(higher=True)
    run_evals(ctx, [0.2, 0.6, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4])
    st = ctx.state
    assert (st.best_step, st.best_valid, st.valid_metric, st.higher_is_better) == (2, 0.6, "reward", True)
    assert st.describe_best() == "best validation reward 0.6000 at step 2"
    loss_ctx = fake_ctx(higher=False)
    run_evals(loss_ctx, [0.2, 0.6, 0.4, 0.5], [0.4, 0.3, 0.2, 0.1])
    assert (loss_ctx.state.best_step, loss_ctx.state.best_valid) == (1, 0.2)
    assert loss_ctx.state.describe_best() == "best validation loss 0.2000 at step 1"


def test_reward_early_stopping_and_overfitting_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    """Patience 2: validation reward 0.5, then 0.4 and 0.3 (two evaluations worse than the best) while the
    training reward keeps rising -> overfitting to the training prompts: warn and stop at the third evaluation.
    The same validation numbers with a falling training reward are not overfitting: no stop."""
    saved: list[Any] = []
    monkeypatch.setattr(loop_mod.ckpt, "save_weights", lambda *a, **k: saved.append(a))
    ctx = fake_ctx(higher=True, early_stopping=True)
    assert run_evals(ctx, [0.5, 0.4, 0.3], [0.1, 0.2, 0.3]) == [False, False, True]
    assert ctx.state.stopped_early and ctx.state.best_step == 1 and len(saved) == 1  # best weights kept once
    warning = ctx.tracker.rows[-1].warning
    assert "validation reward has fallen for 2 evaluations while training reward rises" in warning
    assert "highest validation reward 0.5000 was at step 1" in warning
    calm = fake_ctx(higher=True, early_stopping=True)
    assert run_evals(calm, [0.5, 0.4, 0.3], [0.3, 0.2, 0.1]) == [False, False, False]


def test_state_saved_before_the_rename_loads() -> None:
    st = LoopState.from_dict({"step": 3, "last_train_loss": 1.5, "train_loss_at_best": 2.0, "best_valid": 1.0})
    assert (st.step, st.last_train_metric, st.train_metric_at_best, st.valid_metric) == (3, 1.5, 2.0, "loss")


def test_adalora_is_a_step_hook_not_a_loop_special_case() -> None:
    raw: dict[str, Any] = {"model": {"name": "m"}, "data": {"train": "t.jsonl"}}
    assert finetune_hooks(config_from_dict(raw)) == []
    hooks = finetune_hooks(config_from_dict({**raw, "finetune": "adalora", "lora": {"init_r": 8, "target_r": 4}}))
    assert [type(h) for h in hooks] == [AdaLoraRankStep]
    import inspect

    for fn in (loop_mod.run_loop, loop_mod.train_step, loop_mod.optimizer_step):
        assert "finetune" not in inspect.getsource(fn) and "adalora" not in inspect.getsource(fn).lower()

    calls: list[int] = []
    base = SimpleNamespace(update_and_allocate=calls.append)
    ctx = SimpleNamespace(unwrap=lambda: SimpleNamespace(base_model=base), scheduler=SimpleNamespace(last_epoch=7))
    hooks[0].on_optimizer_step(ctx)  # type: ignore[arg-type]
    assert calls == [7]  # the optimizer-step count (the schedule's), also when RL takes several per loop step


def _rollout(prompts: list[list[int]], comps: list[list[int]], pad: int = 0) -> Rollout:
    P, T = max(map(len, prompts)), max(map(len, comps))
    ids = torch.full((len(prompts), P + T), pad)
    att = torch.zeros_like(ids)
    cm = torch.zeros(len(prompts), T, dtype=torch.long)
    for i, (p, c) in enumerate(zip(prompts, comps, strict=True)):
        ids[i, P - len(p) : P], att[i, P - len(p) : P] = torch.tensor(p), 1
        ids[i, P : P + len(c)], att[i, P : P + len(c)], cm[i, : len(c)] = torch.tensor(c), 1, 1
    return Rollout(ids, att, P, cm, [str(c) for c in comps])


def test_experience_cat_and_select_keep_every_rows_log_probs(model: Any) -> None:
    """Two rollout micro-batches of different prompt and completion widths are re-padded into one
    experience; a shuffled, trimmed minibatch of it scores every completion token exactly as in its own
    micro-batch (left padding and positions do not leak), and per-token tensors follow their rows."""
    a = _rollout([[5, 6, 7], [8]], [[9, 10], [11, 12, 13, 14]])
    b = _rollout([[15, 16, 17, 18, 19]], [[20]])
    with torch.no_grad():
        la, lb = completion_forward(model, a)[0], completion_forward(model, b)[0]
    parts = [Experience(r, torch.tensor([float(i) for i in range(len(r.texts))]), torch.zeros(len(r.texts)), lp)
             for r, lp in ((a, la), (b, lb))]
    exp = Experience.cat(parts)
    assert len(exp) == 3 and exp.rollout.prompt_len == 5 and exp.rollout.completion_mask.shape == (3, 4)
    assert exp.num_tokens == 2 + 4 + 1 and exp.rollout.texts == a.texts + b.texts
    sub = exp.select(torch.tensor([2, 0]))  # b's row, then a's first: widths trim to prompt 5, completion 2
    assert sub.rollout.prompt_len == 5 and sub.rollout.completion_mask.shape == (2, 2)
    assert sub.rollout.texts == [b.texts[0], a.texts[0]]
    with torch.no_grad():
        again = completion_forward(model, sub.rollout)[0]
    torch.testing.assert_close(again[0, :1], lb[0, :1], atol=1e-5, rtol=0)
    torch.testing.assert_close(again[1, :2], la[0, :2], atol=1e-5, rtol=0)
    assert sub.old_logps is not None
    torch.testing.assert_close(sub.old_logps, again, atol=1e-5, rtol=0)  # the stored log-probs went along
    short = exp.select(torch.tensor([1]))  # a's second row: prompt of 1 token -> 4 leading columns dropped
    assert short.rollout.prompt_len == 1 and short.rollout.input_ids[0].tolist() == [8, 11, 12, 13, 14]


def test_more_minibatches_than_completions_is_a_config_error() -> None:
    from tunelab.errors import TunelabError

    raw: dict[str, Any] = {"model": {"name": "m"}, "data": {"train": "t.jsonl"}, "method": "grpo",
                           "train": {"batch_size": 2, "grad_accum": 1},
                           "grpo": {"group_size": 2, "num_minibatches": 5, "rewards": [{"fn": "json_valid"}]}}
    with pytest.raises((TunelabError, ValueError), match=r"grpo.num_minibatches=5 is more than the 4 completions"):
        config_from_dict(raw)
    raw["grpo"]["num_minibatches"] = 4
    assert config_from_dict(raw).grpo is not None
