"""Preference / RL losses: values worked out by hand (in each docstring), and agreement with TRL 1.16's own
implementations on the same batch (TRL is a test-only dependency; its trainers are driven through minimal
stand-ins for `self` and the model so no weights or data are downloaded)."""

from __future__ import annotations

import math
from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tunelab.preference_losses import (
    dpo_loss,
    kto_kl_estimate,
    kto_loss,
    orpo_loss,
    reward_loss,
    simpo_loss,
)

T = torch.tensor


def test_dpo_sigmoid_by_hand() -> None:
    """policy (chosen, rejected) = (-1, -2), reference (-1.5, -1.5), beta = 0.5.
    log-ratios: chosen +0.5, rejected -0.5, h = 1.0; loss = -log sigmoid(0.5) = log(1 + e^-0.5) = 0.474077.
    Implicit rewards 0.25 and -0.25: margin 0.5, accuracy 1."""
    loss, m = dpo_loss(T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]), beta=0.5)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(0.25)
    assert m["rewards/rejected"] == pytest.approx(-0.25)
    assert m["rewards/margin"] == pytest.approx(0.5)
    assert m["rewards/accuracy"] == 1.0


def test_dpo_hinge_ipo_and_smoothing_by_hand() -> None:
    """Same pair. hinge: max(0, 1 - 0.5 * 1) = 0.5.
    IPO with 2 chosen and 4 rejected tokens: h' = 0.5/2 - (-0.5/4) = 0.375; (0.375 - 1/(2*0.5))^2 = 0.390625.
    label_smoothing 0.1: 0.9 * log(1+e^-0.5) + 0.1 * log(1+e^0.5) = 0.426669 + 0.097408 = 0.524077."""
    args = (T([-1.0]), T([-2.0]), T([-1.5]), T([-1.5]))
    assert dpo_loss(*args, beta=0.5, loss_type="hinge")[0].item() == pytest.approx(0.5)
    ipo, _ = dpo_loss(*args, beta=0.5, loss_type="ipo", chosen_lengths=T([2.0]), rejected_lengths=T([4.0]))
    assert ipo.item() == pytest.approx(0.390625)
    assert dpo_loss(*args, beta=0.5, label_smoothing=0.1)[0].item() == pytest.approx(0.524077, abs=1e-6)
    with pytest.raises(ValueError, match="lengths"):
        dpo_loss(*args, loss_type="ipo")


def test_num_items_normalises_sums() -> None:
    """Two pairs with losses a and b: num_items=4 gives (a + b) / 4, half of the batch mean."""
    args = (T([-1.0, -3.0]), T([-2.0, -1.0]), T([-1.5, -2.0]), T([-1.5, -2.0]))
    mean, _ = dpo_loss(*args)
    summed, _ = dpo_loss(*args, num_items=4)
    assert summed.item() == pytest.approx(mean.item() / 2)


def test_orpo_by_hand() -> None:
    """chosen: sum -2 over 4 tokens (mean -0.5); rejected: sum -3 over 3 tokens (mean -1); beta 0.1, nll 1.2.
    log odds(-0.5) = -0.5 - log(1 - e^-0.5) = -0.5 + 0.932752 = 0.432752
    log odds(-1)   = -1 - log(1 - e^-1)     = -1 + 0.458675 = -0.541325
    ratio = log sigmoid(0.974077) = -0.320292; loss = 1.2 + 0.1 * 0.320292 = 1.232029."""
    loss, m = orpo_loss(T([-2.0]), T([-3.0]), T([4.0]), T([3.0]), T(1.2), beta=0.1)
    assert loss.item() == pytest.approx(1.232029, abs=1e-5)
    assert m["log_odds_ratio"] == pytest.approx(-0.320292, abs=1e-5)
    assert m["rewards/chosen"] == pytest.approx(-0.05) and m["rewards/accuracy"] == 1.0


def test_simpo_by_hand() -> None:
    """Same sums/lengths, beta 2, gamma 0.5: rewards 2*(-0.5) = -1 and 2*(-1) = -2; z = -1 + 2 - 0.5 = 0.5;
    loss = log(1 + e^-0.5) = 0.474077."""
    loss, m = simpo_loss(T([-2.0]), T([-3.0]), T([4.0]), T([3.0]), beta=2.0, gamma=0.5)
    assert loss.item() == pytest.approx(0.474077, abs=1e-6)
    assert m["rewards/margin"] == pytest.approx(1.0)


def test_kto_by_hand() -> None:
    """Log-ratios r = +1 (desirable) and -2 (undesirable), z0 = 0.5, beta = 1:
    desirable 1 - sigmoid(1 - 0.5) = 0.377541; undesirable 1 - sigmoid(0.5 + 2) = 0.075858; mean 0.226700.
    KL estimate of log-ratios (0.3, 0.7) is 0.5; of (-0.3, -0.7) is clamped to 0."""
    kl = kto_kl_estimate(T([-1.0, -1.0]), T([-1.3, -1.7]))
    assert kl.item() == pytest.approx(0.5)
    assert kto_kl_estimate(T([-1.3, -1.7]), T([-1.0, -1.0])).item() == 0.0
    loss, m = kto_loss(T([-1.0, -4.0]), T([-2.0, -2.0]), T([True, False]), kl, beta=1.0)
    assert loss.item() == pytest.approx(0.226700, abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(1.0) and m["rewards/rejected"] == pytest.approx(-2.0)
    assert m["rewards/accuracy"] == 1.0
    weighted, _ = kto_loss(T([-1.0, -4.0]), T([-2.0, -2.0]), T([True, False]), kl, beta=1.0, undesirable_weight=2.0)
    assert weighted.item() == pytest.approx((0.377541 + 2 * 0.075858) / 2, abs=1e-6)


def test_reward_loss_by_hand() -> None:
    """r_w = 2, r_l = 1: -log sigmoid(1) = 0.313262; with margin 1: -log sigmoid(0) = log 2 = 0.693147;
    center_coef 0.01 adds 0.01 * (2 + 1)^2 = 0.09."""
    assert reward_loss(T([2.0]), T([1.0]))[0].item() == pytest.approx(0.313262, abs=1e-6)
    assert reward_loss(T([2.0]), T([1.0]), margin=T([1.0]))[0].item() == pytest.approx(math.log(2))
    assert reward_loss(T([2.0]), T([1.0]), center_coef=0.01)[0].item() == pytest.approx(0.403262, abs=1e-6)
    _, m = reward_loss(T([2.0, 0.0]), T([1.0, 1.0]))
    assert m["rewards/accuracy"] == 0.5 and m["rewards/margin"] == pytest.approx(0.0)


# ------------------------------------------------------------------------------------------------ TRL parity


class _Acc:
    """What TRL's trainers use from `accelerate.Accelerator` on one process."""

    device = torch.device("cpu")
    num_processes = 1

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    def unwrap_model(self, m: Any) -> Any:
        return m


class _FakeLM(torch.nn.Module):
    """Stands in for a TRL fused-LM-head model: the log-prob of token t is -0.01 * id(t) - 0.3 * (pos % 3),
    zero where the label is -100. Deterministic, so tunelab and TRL see identical per-token log-probs."""

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None, **_: Any) -> Any:
        assert labels is not None
        lab = labels[:, 1:]
        pos = torch.arange(lab.size(1)).expand_as(lab)
        lp = (-0.01 * input_ids[:, 1:].float() - 0.3 * (pos % 3)) * (lab != -100)
        z = torch.zeros_like(lp)
        return SimpleNamespace(log_probs=lp, entropy=z, mean_logits=z, is_top1=z.bool(), log_sum_sq_probs=z)


def _seq_logps(ids: torch.Tensor, cmask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    out = _FakeLM()(ids, labels=ids.masked_fill(cmask == 0, -100))
    return out.log_probs.sum(-1), cmask[:, 1:].sum(-1).float()


def _pair_batch(seed: int = 0, b: int = 3, length: int = 9) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 200, (2 * b, length), generator=g)
    cmask = torch.zeros(2 * b, length, dtype=torch.long)
    for i in range(2 * b):
        start = int(torch.randint(2, 5, (1,), generator=g))
        end = int(torch.randint(start + 1, length + 1, (1,), generator=g))
        cmask[i, start:end] = 1
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": cmask}


def _trainer_self(**kw: Any) -> Any:
    base = dict(model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False,
                _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0, _tp_size=1,
                label_smoothing=0.0)
    base.update(kw)
    return SimpleNamespace(**base)


@pytest.mark.parametrize("loss_type", ["sigmoid", "hinge", "ipo"])
def test_dpo_matches_trl(loss_type: str) -> None:
    from trl import DPOTrainer

    batch = _pair_batch()
    ref = torch.tensor([-3.0, -2.5, -4.0, -3.5, -1.0, -2.0])  # precomputed reference log-probs (chosen, rejected)
    inputs = {**batch, "ref_chosen_logps": ref[:3], "ref_rejected_logps": ref[3:]}
    me = _trainer_self(beta=0.3, loss_types=[loss_type], loss_weights=[1.0], ld_alpha=None,
                       precompute_ref_logps=True, f_divergence_type="reverse_kl", use_weighting=False,
                       args=SimpleNamespace())
    trl_loss = DPOTrainer._compute_loss(me, _FakeLM(), inputs, False)
    logps, lengths = _seq_logps(batch["input_ids"], batch["completion_mask"])
    ours, m = dpo_loss(logps[:3], logps[3:], ref[:3], ref[3:], beta=0.3, loss_type=loss_type,  # type: ignore[arg-type]
                       chosen_lengths=batch["completion_mask"][:3].sum(-1).float(),
                       rejected_lengths=batch["completion_mask"][3:].sum(-1).float())
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert m["rewards/margin"] == pytest.approx(me._metrics["train"]["rewards/margins"][0], abs=1e-5)
    assert m["rewards/accuracy"] == pytest.approx(me._metrics["train"]["rewards/accuracies"][0])
    del lengths


def test_orpo_matches_trl() -> None:
    from trl.experimental.orpo import ORPOTrainer

    batch = _pair_batch(1)
    logps, lengths = _seq_logps(batch["input_ids"], batch["completion_mask"])
    nll = torch.tensor(1.7)
    me = SimpleNamespace(beta=0.25, accelerator=_Acc())
    # TRL: loss = nll - mean(beta * log sigmoid(log odds)) from per-token *average* log-probs.
    losses, *_ = ORPOTrainer.odds_ratio_loss(me, logps[:3] / lengths[:3], logps[3:] / lengths[3:])
    ours, _ = orpo_loss(logps[:3], logps[3:], lengths[:3], lengths[3:], nll, beta=0.25)
    assert ours.item() == pytest.approx((nll - losses.mean()).item(), abs=1e-5)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_simpo_matches_trl(smoothing: float) -> None:
    from trl.experimental.cpo import CPOTrainer

    batch = _pair_batch(2)
    logps, lengths = _seq_logps(batch["input_ids"], batch["completion_mask"])
    me = SimpleNamespace(beta=2.5, simpo_gamma=1.3, alpha=0.0, loss_type="simpo", label_smoothing=smoothing,
                         accelerator=_Acc())
    losses, _, _ = CPOTrainer.cpo_loss(me, logps[:3] / lengths[:3], logps[3:] / lengths[3:])
    ours, _ = simpo_loss(logps[:3], logps[3:], lengths[:3], lengths[3:], beta=2.5, gamma=1.3,
                         label_smoothing=smoothing)
    assert ours.item() == pytest.approx(losses.mean().item(), abs=1e-5)


def test_kto_matches_trl() -> None:
    from trl import KTOTrainer

    b = _pair_batch(3)
    g = torch.Generator().manual_seed(7)
    kl_ids = torch.randint(0, 200, b["input_ids"].shape, generator=g)
    kl_mask = b["completion_mask"].roll(1, 0)
    label = torch.tensor([True, False, True, True, False, False])
    ref = torch.tensor([-3.0, -2.5, -4.0, -3.5, -1.0, -2.0])
    ref_kl = torch.tensor([-9.0, -12.0, -10.0, -11.0, -8.0, -13.0])
    inputs = {**b, "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones_like(kl_ids),
              "KL_completion_mask": kl_mask, "label": label, "ref_logps": ref, "ref_KL_logps": ref_kl}
    me = _trainer_self(beta=0.2, loss_type="kto", calculate_KL=True, precompute_ref_logps=True,
                       desirable_weight=1.0, undesirable_weight=1.5)
    me._compute_kl_logps = lambda model, batch: KTOTrainer._compute_kl_logps(me, model, batch)
    trl_loss = KTOTrainer._compute_loss(me, _FakeLM(), inputs, False)
    logps, _ = _seq_logps(b["input_ids"], b["completion_mask"])
    kl_logps, _ = _seq_logps(kl_ids, kl_mask)
    kl = kto_kl_estimate(kl_logps, ref_kl)
    ours, m = kto_loss(logps, ref, label, kl, beta=0.2, desirable_weight=1.0, undesirable_weight=1.5)
    assert kl.item() > 0  # the shift z0 is exercised, not clamped away
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert m["kl"] == pytest.approx(me._metrics["train"]["kl"][0], abs=1e-6)
    assert m["rewards/chosen"] == pytest.approx(me._metrics["train"]["rewards/chosen"][0], abs=1e-5)


@pytest.mark.parametrize("with_margin", [False, True])
def test_reward_matches_trl(with_margin: bool) -> None:
    from trl import RewardTrainer

    scores = torch.tensor([[0.3], [-1.2], [2.0], [0.1], [0.4], [-0.5]])

    class _RM(torch.nn.Module):
        def forward(self, **_: Any) -> Any:
            return SimpleNamespace(logits=scores)

    margin = torch.tensor([0.5, 0.0, 1.0])
    inputs: dict[str, Any] = {"input_ids": torch.zeros(6, 3, dtype=torch.long), "attention_mask": torch.ones(6, 3)}
    if with_margin:
        inputs["margin"] = margin
    me = _trainer_self(args=SimpleNamespace(center_rewards_coefficient=0.01))
    trl_loss = RewardTrainer.compute_loss(me, _RM(), inputs)
    ours, m = reward_loss(scores[:3, 0], scores[3:, 0], margin=margin if with_margin else None, center_coef=0.01)
    assert ours.item() == pytest.approx(trl_loss.item(), abs=1e-5)
    assert m["rewards/accuracy"] == pytest.approx(me._metrics["train"]["accuracy"][0])
