"""Preference and RL losses as pure functions of per-sequence / per-token log-probabilities and rewards.

Each returns `(loss, metrics)` and knows nothing about models, tokenizers or optimizers: the method files in
`tunelab/train/` compute log-probs (with `tunelab.losses.sequence_logps`) and call these. Shared conventions:

* Sequence log-probs are *sums* over the completion tokens; losses that want a per-token average (ORPO,
  SimPO, IPO) take the token counts and divide themselves, so the caller never has to know which wants what.
* `num_items=None` averages over the examples in the batch. The training loop passes the number of examples
  in the whole optimizer step instead, so gradient accumulation equals one big batch (as with `sft_loss`).
* Metrics are plain floats: batch means, plus `pairs` / `examples` counts so callers can weight-average.

Hand-checked in tests/unit/test_pref_losses.py; DPO, ORPO, SimPO, KTO and reward losses are also checked
against TRL's implementations there.
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


# ---------------------------------------------------------------------------------------------- PPO


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero-mean unit-variance over the masked entries (PPO normalises advantages per batch)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


def ppo_token_rewards(
    scores: torch.Tensor,
    logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    kl_coef: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLHF's shaped reward: -kl_coef * (log pi - log ref) at every completion token, plus the sequence score
    (reward model, minus any length penalty) at the last one. Returns (rewards (B, T), per-token KL (B, T))."""
    m = mask.to(logps.dtype)
    kl = (logps - ref_logps) * m
    rewards = -kl_coef * kl
    last = (m.cumsum(-1) * m).argmax(-1)  # index of each row's last completion token
    rewards = rewards.clone()
    rewards[torch.arange(rewards.size(0)), last] += scores.to(rewards.dtype)
    return rewards, kl


def gae_advantages(
    rewards: torch.Tensor,
    values: torch.Tensor,
    mask: torch.Tensor,
    *,
    gamma: float = 1.0,
    lam: float = 0.95,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised Advantage Estimation (Schulman et al. 2016) over completion tokens (B, T).

      delta_t = r_t + gamma * V_{t+1} - V_t      (V after the last completion token is 0)
      A_t     = delta_t + gamma * lam * A_{t+1}
    Returns (advantages, returns = advantages + values), both zero outside the mask.
    """
    m = mask.to(values.dtype)
    r, v = rewards * m, values * m
    T = r.size(1)
    adv = torch.zeros_like(v)
    last = torch.zeros_like(v[:, 0])
    for t in reversed(range(T)):
        next_v = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * next_v - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]
        adv[:, t] = last
    return adv, (adv + v) * m


def ppo_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017), token-level mean over the mask:

      loss = mean(max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))),  ratio = exp(logp - old_logp)
    Metrics: clip fraction (how often the clipped branch was chosen) and approximate KL to the sampling policy.
    """
    ratio = torch.exp(logps - old_logps)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        clipfrac = masked_mean((clipped > unclipped).float(), mask)
        approx_kl = masked_mean(0.5 * (logps - old_logps) ** 2, mask)
    return loss, {"policy_loss": float(loss.detach()), "clipfrac": float(clipfrac), "approx_kl": float(approx_kl)}


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2)) over the mask."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.maximum(l1, l2), mask)
    with torch.no_grad():
        vf_clipfrac = masked_mean((l2 > l1).float(), mask)
    return loss, {"value_loss": float(loss.detach()), "vf_clipfrac": float(vf_clipfrac)}


# ---------------------------------------------------------------------------------------------- GRPO


def grpo_advantages(rewards: torch.Tensor, group_size: int, *, scale: bool = True, eps: float = 1e-4) -> torch.Tensor:
    """Group-relative advantages (Shao et al. 2024): each completion's reward minus its group's mean, divided by
    the group's (unbiased) standard deviation when `scale`. `rewards` is (num_prompts * group_size,), grouped
    contiguously. A group whose completions all scored the same gets zero advantage: nothing to learn from."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    g = rewards.float().view(-1, group_size)
    adv = g - g.mean(dim=1, keepdim=True)
    if scale and group_size > 1:
        adv = adv / (g.std(dim=1, keepdim=True) + eps)
    return adv.reshape(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's per-token clipped objective with the sequence advantage broadcast to every token, plus kl_coef
    times the k3 KL estimator exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0). Normalised over all
    completion tokens in the batch (TRL's "bnpo"), so long completions are not down-weighted per token."""
    adv = advantages.float().unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    per_token = -torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    metrics: dict[str, float] = {}
    if ref_logps is not None and kl_coef:
        d = ref_logps - logps
        kl = torch.exp(d) - d - 1
        per_token = per_token + kl_coef * kl
        metrics["kl"] = float(masked_mean(kl.detach(), mask))
    loss = masked_mean(per_token, mask)
    with torch.no_grad():
        clipped = ((ratio < 1 - clip_eps) & (adv < 0)) | ((ratio > 1 + clip_eps) & (adv > 0))
        metrics["clipfrac"] = float(masked_mean(clipped.float(), mask))
    metrics["policy_loss"] = float(loss.detach())
    return loss, metrics
