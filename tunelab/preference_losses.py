"""Preference losses as pure functions of per-sequence / per-token log-probabilities and rewards.

Each returns `(loss, metrics)` and knows nothing about models, tokenizers or optimizers: the method files in
`tunelab/train/` compute log-probs (with `tunelab.losses.sequence_logps`) and call these. Shared conventions:

* Sequence log-probs are *sums* over the completion tokens; losses that want a per-token average (ORPO,
  SimPO, IPO) take the token counts and divide themselves, so the caller never has to know which wants what.
* `num_items=None` averages over the examples in the batch. The training loop passes the number of examples
  in the whole optimizer step instead, so gradient accumulation equals one big batch (as with `sft_loss`).
* Metrics are plain floats: batch means, plus `pairs` / `examples` counts so callers can weight-average.

Hand-checked in tests/unit/test_pref_losses.py; DPO, ORPO, SimPO, KTO and reward losses are also checked
against TRL's implementations there. The online RL pieces (PPO, GRPO) are in `tunelab.rl_losses`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DPOLossType = Literal["sigmoid", "ipo", "hinge"]


def _reduce(per_item: torch.Tensor, num_items: float | None) -> torch.Tensor:
    if num_items is None:
        return per_item.mean()
    return per_item.sum() / num_items


def _pair_metrics(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor) -> dict[str, float]:
    """The metrics every pairwise method reports, from per-pair (detached) implicit or explicit rewards."""
    c, r = chosen_rewards.detach().float(), rejected_rewards.detach().float()
    return {
        "rewards/chosen": float(c.mean()),
        "rewards/rejected": float(r.mean()),
        "rewards/margin": float((c - r).mean()),
        "rewards/accuracy": float((c > r).float().mean()),
        "pairs": float(c.numel()),
    }


# ---------------------------------------------------------------------------------------------- DPO family


def dpo_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor,
    ref_rejected_logps: torch.Tensor,
    *,
    beta: float = 0.1,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: torch.Tensor | None = None,
    rejected_lengths: torch.Tensor | None = None,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Direct Preference Optimization (Rafailov et al. 2023) and two variants.

    With h = (log pi(yw) - log ref(yw)) - (log pi(yl) - log ref(yl)):
      sigmoid: -log sigmoid(beta h)  (label_smoothing eps mixes in -eps*log sigmoid(-beta h): conservative DPO)
      hinge:   max(0, 1 - beta h)    (SLiC)
      ipo:     (h' - 1/(2 beta))^2   with h' built from per-token *average* log-ratios (IPO, Azar et al. 2023;
               the per-token normalisation is what TRL and the IPO authors use), so lengths are required.
    The implicit reward of a completion is beta * (log pi - log ref); accuracy is how often chosen's is higher.
    """
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * h)
    elif loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError("ipo needs chosen_lengths and rejected_lengths (completion token counts)")
        h_avg = chosen_ratio / chosen_lengths.clamp(min=1) - rejected_ratio / rejected_lengths.clamp(min=1)
        per_pair = (h_avg - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"unknown DPO loss_type {loss_type!r} (sigmoid, ipo, hinge)")
    metrics = _pair_metrics(beta * chosen_ratio, beta * rejected_ratio)
    metrics["logps/chosen"] = float(policy_chosen_logps.detach().float().mean())
    metrics["logps/rejected"] = float(policy_rejected_logps.detach().float().mean())
    return _reduce(per_pair, num_items), metrics


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable on both sides of -ln 2 (Maechler 2012)."""
    return torch.where(x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    nll: torch.Tensor,
    *,
    beta: float = 0.1,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """ORPO (Hong et al. 2024): SFT loss plus an odds-ratio penalty; no reference model.

    With p = exp(mean token log-prob) of a completion and odds(p) = p / (1 - p):
      loss = nll - beta * log sigmoid(log odds(p_w) - log odds(p_l))
    `nll` is the (already normalised) SFT loss on the chosen completions, which the caller computes with
    `sft_loss`. Rewards reported are beta * mean log-prob (as in the paper and TRL).
    """
    cw = chosen_logps.float() / chosen_lengths.clamp(min=1)
    cl = rejected_logps.float() / rejected_lengths.clamp(min=1)
    log_odds = (cw - cl) - (_log1mexp(cw) - _log1mexp(cl))
    ratio = F.logsigmoid(log_odds)
    or_term = _reduce(-beta * ratio, num_items)
    metrics = _pair_metrics(beta * cw, beta * cl)
    metrics.update(
        {"nll": float(nll.detach()), "log_odds_ratio": float(ratio.detach().mean()),
         "log_odds": float(log_odds.detach().mean())}
    )
    return nll + or_term, metrics


def simpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    chosen_lengths: torch.Tensor,
    rejected_lengths: torch.Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
    label_smoothing: float = 0.0,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """SimPO (Meng et al. 2024): a reference-free reward beta * mean token log-prob, and a target margin gamma.

      loss = -log sigmoid(beta/|yw| log pi(yw) - beta/|yl| log pi(yl) - gamma)
    """
    rw = beta * chosen_logps.float() / chosen_lengths.clamp(min=1)
    rl = beta * rejected_logps.float() / rejected_lengths.clamp(min=1)
    z = rw - rl - gamma
    per_pair = -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)
    return _reduce(per_pair, num_items), _pair_metrics(rw, rl)


# ---------------------------------------------------------------------------------------------- KTO


def kto_kl_estimate(policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
    """KTO's reference point z0: the batch-mean log-ratio on *mismatched* (prompt, completion) pairs, clamped at
    zero and detached (it shifts the loss but is not trained through, as in the paper and TRL)."""
    return (policy_kl_logps.float() - ref_kl_logps.float()).mean().clamp(min=0).detach()


def kto_loss(
    policy_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    desirable: torch.Tensor,
    kl: torch.Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """KTO (Ethayarajh et al. 2024) on unpaired examples, each labelled desirable or undesirable.

    With r = log pi(y|x) - log ref(y|x) and z0 = `kl` (see `kto_kl_estimate`):
      desirable:   w_d * (1 - sigmoid(beta (r - z0)))
      undesirable: w_u * (1 - sigmoid(beta (z0 - r)))
    Averaged over all examples. Accuracy here is the fraction whose implicit reward beta*r has the right sign.
    """
    desirable = desirable.bool()
    z0 = torch.as_tensor(kl, dtype=torch.float32, device=policy_logps.device)
    r = policy_logps.float() - ref_logps.float()
    per_item = torch.where(
        desirable,
        desirable_weight * (1 - torch.sigmoid(beta * (r - z0))),
        undesirable_weight * (1 - torch.sigmoid(beta * (z0 - r))),
    )
    rewards = (beta * r).detach()
    metrics: dict[str, float] = {"kl": float(z0), "examples": float(r.numel())}
    if desirable.any():
        metrics["rewards/chosen"] = float(rewards[desirable].mean())
    if (~desirable).any():
        metrics["rewards/rejected"] = float(rewards[~desirable].mean())
    if desirable.any() and (~desirable).any():
        metrics["rewards/margin"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    metrics["rewards/accuracy"] = float(((rewards > 0) == desirable).float().mean())
    return _reduce(per_item, num_items), metrics


# ---------------------------------------------------------------------------------------------- reward model


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_coef: float | None = None,
    num_items: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Bradley-Terry pairwise loss for a scalar reward model (InstructGPT; Llama 2 adds the margin):

      loss = -log sigmoid(r_w - r_l - margin)   [+ center_coef * (r_w + r_l)^2, keeps rewards near zero]
    """
    rw, rl = chosen_rewards.float(), rejected_rewards.float()
    diff = rw - rl if margin is None else rw - rl - margin.float()
    per_pair = -F.logsigmoid(diff)
    if center_coef:
        per_pair = per_pair + center_coef * (rw + rl) ** 2
    return _reduce(per_pair, num_items), _pair_metrics(rw, rl)
