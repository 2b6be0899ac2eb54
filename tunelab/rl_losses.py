"""Online RL pieces (PPO, GRPO) as pure functions of per-token log-probs, values, rewards and masks.

Nothing here knows about models or optimizers: `tunelab/train/ppo.py` and `grpo.py` roll out, score and
call these. Tensors are (B, T) over completion tokens with a 0/1 `mask` (B, T); sequence-level tensors are (B,).

Normalisation: the token-level losses take `num_tokens`, the number of completion tokens in the whole
optimizer step (all micro-batches, all processes). With it, accumulating micro-batches equals one big batch;
without it they average over this batch's tokens. Metrics are plain floats (means over this batch's tokens).

Hand-checked in tests/unit/test_rl_losses.py (numbers worked out in each test's docstring).
"""

from __future__ import annotations

import torch


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp(min=1)


def _token_mean(x: torch.Tensor, mask: torch.Tensor, num_tokens: float | None) -> torch.Tensor:
    if num_tokens is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / max(num_tokens, 1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Zero-mean unit-variance over the masked entries (PPO normalises advantages per batch)."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    return (x - mean) * torch.rsqrt(var + eps) * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------- PPO


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
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO's clipped surrogate (Schulman et al. 2017), token-level over the mask:

      loss = mean(max(-A * ratio, -A * clip(ratio, 1-eps, 1+eps))),  ratio = exp(logp - old_logp)
    `advantages` is (B, T), or (B,) for one advantage per sequence (GRPO), broadcast to its tokens.
    Metrics: clipfrac (how often the clipped branch was chosen, i.e. the token gave no gradient),
    approx_kl (0.5 * mean (logp - old_logp)^2 to the sampling policy) and the ratio's mean, min and max.
    """
    adv = advantages.float()
    if adv.dim() == 1:
        adv = adv.unsqueeze(-1)
    ratio = torch.exp(logps - old_logps)
    unclipped = -adv * ratio
    clipped = -adv * torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps)
    loss = _token_mean(torch.maximum(unclipped, clipped), mask, num_tokens)
    with torch.no_grad():
        on = mask.bool()
        r = ratio[on] if on.any() else torch.ones(1)
        metrics = {
            "policy_loss": float(masked_mean(torch.maximum(unclipped, clipped), mask)),
            "clipfrac": float(masked_mean((clipped > unclipped).float(), mask)),
            "approx_kl": float(masked_mean(0.5 * (logps - old_logps) ** 2, mask)),
            "ratio_mean": float(r.mean()), "ratio_min": float(r.min()), "ratio_max": float(r.max()),
        }
    return loss, metrics


def ppo_value_loss(
    values: torch.Tensor,
    old_values: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_range: float = 0.2,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Clipped value loss: 0.5 * mean(max((V - R)^2, (clip(V, V_old +- c) - R)^2)) over the mask."""
    v_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    l1 = (values - returns) ** 2
    l2 = (v_clipped - returns) ** 2
    per_token = torch.maximum(l1, l2)
    loss = 0.5 * _token_mean(per_token, mask, num_tokens)
    with torch.no_grad():
        vf_clipfrac = masked_mean((l2 > l1).float(), mask)
        value_loss = 0.5 * masked_mean(per_token, mask)
    return loss, {"value_loss": float(value_loss), "vf_clipfrac": float(vf_clipfrac)}


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


def k3_kl(logps: torch.Tensor, ref_logps: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimator of KL(pi || ref): exp(ref - logp) - (ref - logp) - 1 (unbiased, always >= 0)."""
    d = ref_logps - logps
    return torch.exp(d) - d - 1


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_eps: float = 0.2,
    kl_coef: float = 0.04,
    num_tokens: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO's per-token clipped objective with the sequence advantage (B,) broadcast to every token, plus
    kl_coef times the k3 KL to the reference. Normalised over completion tokens (TRL's "bnpo" within a batch;
    over the whole optimizer step with `num_tokens`), so long completions are not down-weighted per token.
    `old_logps` are the sampling policy's: with several optimizer steps per rollout the ratio moves off 1."""
    policy, metrics = ppo_policy_loss(logps, old_logps, advantages, mask, clip_eps=clip_eps, num_tokens=num_tokens)
    loss = policy
    if ref_logps is not None and kl_coef:
        kl = k3_kl(logps, ref_logps)
        loss = loss + kl_coef * _token_mean(kl, mask, num_tokens)
        metrics["kl"] = float(masked_mean(kl.detach(), mask))
    return loss, metrics
