"""PPO / GRPO pieces (tunelab/rl_losses.py) against numbers worked out by hand in each test's docstring."""

from __future__ import annotations

import math

import pytest
import torch

from tunelab.rl_losses import (
    gae_advantages,
    grpo_advantages,
    grpo_loss,
    masked_whiten,
    ppo_policy_loss,
    ppo_token_rewards,
    ppo_value_loss,
)

T = torch.tensor


def test_gae_by_hand() -> None:
    """One row, rewards (0, 1), values (0.5, 0.5), a padded third position (ignored), gamma 1.
    lam 1:   delta = (0 + 0.5 - 0.5, 1 + 0 - 0.5) = (0, 0.5); A = (0.5, 0.5); returns = (1, 1).
    lam 0.5: A_1 = 0.5, A_0 = 0 + 0.5 * 0.5 = 0.25; returns = (0.75, 1)."""
    r, v, mask = T([[0.0, 1.0, 9.0]]), T([[0.5, 0.5, 9.0]]), T([[1, 1, 0]])
    adv, ret = gae_advantages(r, v, mask, gamma=1.0, lam=1.0)
    assert adv.tolist() == [[0.5, 0.5, 0.0]] and ret.tolist() == [[1.0, 1.0, 0.0]]
    adv, ret = gae_advantages(r, v, mask, gamma=1.0, lam=0.5)
    assert adv.tolist() == [[0.25, 0.5, 0.0]] and ret.tolist() == [[0.75, 1.0, 0.0]]


def test_ppo_losses_by_hand() -> None:
    """Policy: A = 1 on two tokens, ratios 1.5 and 0.5, eps 0.2.
    token 1: max(-1.5, -1.2) = -1.2 (clipped); token 2: max(-0.5, -0.8) = -0.5; mean -0.85; clipfrac 0.5.
    Value: V = 1, V_old = 0.5, R = 2, c = 0.2: clipped V = 0.7; max((1-2)^2, (0.7-2)^2) = 1.69; loss 0.845.
    Shaped reward: logp - ref = (0.5, -0.5), kl_coef 0.1, score 1 at the last real token: (-0.05, 1.05, 0)."""
    logps = torch.log(T([[1.5, 0.5]]))
    loss, m = ppo_policy_loss(logps, torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), clip_eps=0.2)
    assert loss.item() == pytest.approx(-0.85) and m["clipfrac"] == 0.5
    vloss, vm = ppo_value_loss(T([1.0]), T([0.5]), T([2.0]), T([1]), clip_range=0.2)
    assert vloss.item() == pytest.approx(0.845) and vm["vf_clipfrac"] == 1.0
    rewards, kl = ppo_token_rewards(T([1.0]), T([[-1.0, -1.0, -7.0]]), T([[-1.5, -0.5, 0.0]]), T([[1, 1, 0]]),
                                    kl_coef=0.1)
    assert rewards[0].tolist() == pytest.approx([-0.05, 1.05, 0.0]) and kl.tolist() == [[0.5, -0.5, 0.0]]


def test_grpo_by_hand() -> None:
    """Groups of 2: rewards (1, 0) -> mean 0.5, unbiased std 0.707107 -> advantages +-0.707007 (eps 1e-4);
    a group (1, 1) has no spread -> (0, 0).
    Loss with ratio 1 and ref == policy: -(mean of advantages over tokens). Advantages (1, -1), masks (1, 1)
    and (1, 0): (-1 - 1 + 1) / 3 = -1/3. With ref - logp = 0.5 on every token the k3 KL is
    e^0.5 - 0.5 - 1 = 0.148721, adding 0.04 * 0.148721."""
    adv = grpo_advantages(T([1.0, 0.0, 1.0, 1.0]), group_size=2)
    assert adv.tolist() == pytest.approx([0.707007, -0.707007, 0.0, 0.0], abs=1e-6)
    with pytest.raises(ValueError):
        grpo_advantages(T([1.0, 0.0, 1.0]), group_size=2)
    lp = torch.full((2, 2), -1.0)
    mask = T([[1, 1], [1, 0]])
    loss, m = grpo_loss(lp, lp, lp, T([1.0, -1.0]), mask)
    assert loss.item() == pytest.approx(-1 / 3)
    loss_kl, m = grpo_loss(lp, lp, lp + 0.5, T([1.0, -1.0]), mask, kl_coef=0.04)
    assert loss_kl.item() == pytest.approx(-1 / 3 + 0.04 * 0.148721, abs=1e-6)
    assert m["kl"] == pytest.approx(0.148721, abs=1e-6)


def test_gae_discounted_two_rows_by_hand() -> None:
    """gamma 0.9, lam 0.8 (gamma * lam = 0.72). V after a row's last real token is 0.
    Row 0, rewards (1, 0, 2), values (0.5, 1.0, 0.5), all real:
      t2: delta = 2 + 0 - 0.5 = 1.5;          A2 = 1.5
      t1: delta = 0 + 0.9*0.5 - 1.0 = -0.55;  A1 = -0.55 + 0.72*1.5 = 0.53
      t0: delta = 1 + 0.9*1.0 - 0.5 = 1.4;    A0 = 1.4 + 0.72*0.53 = 1.7816
      returns = A + V = (2.2816, 1.53, 2.0)
    Row 1, rewards (0, 1, 5), values (0.2, 0.4, 7), third position padding (its 5 and 7 must not leak in):
      t1: delta = 1 + 0 - 0.4 = 0.6;          A1 = 0.6
      t0: delta = 0 + 0.9*0.4 - 0.2 = 0.16;   A0 = 0.16 + 0.72*0.6 = 0.592
      returns = (0.792, 1.0, 0)"""
    r = T([[1.0, 0.0, 2.0], [0.0, 1.0, 5.0]])
    v = T([[0.5, 1.0, 0.5], [0.2, 0.4, 7.0]])
    mask = T([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae_advantages(r, v, mask, gamma=0.9, lam=0.8)
    assert adv.tolist() == [pytest.approx([1.7816, 0.53, 1.5]), pytest.approx([0.592, 0.6, 0.0])]
    assert ret.tolist() == [pytest.approx([2.2816, 1.53, 2.0]), pytest.approx([0.792, 1.0, 0.0])]


def test_clipped_objective_both_signs_by_hand() -> None:
    """eps 0.2, ratios (1.5, 0.5, 1.1, 0.7, 3.0), advantages (1, 1, -2, -2, 1), the fifth token masked out.
    per token max(-A r, -A clip(r, 0.8, 1.2)):
      t1: max(-1.5, -1.2) = -1.2  clipped (A > 0, ratio above 1 + eps: no more push)
      t2: max(-0.5, -0.8) = -0.5  not clipped (A > 0 and the ratio fell: the gradient still pulls it up)
      t3: max( 2.2,  2.2) =  2.2  inside the range
      t4: max( 1.4,  1.6) =  1.6  clipped (A < 0, ratio below 1 - eps)
    loss = (-1.2 - 0.5 + 2.2 + 1.6) / 4 = 0.525; clipfrac 2/4; ratio mean 0.95, min 0.5, max 1.5;
    approx_kl = 0.5 * mean(log r)^2 = 0.5 * (0.164402 + 0.480453 + 0.009084 + 0.127217) / 4 = 0.097645.
    Gradient wrt logp (d ratio / d logp = ratio): clipped tokens 0; t2: -1 * 0.5 / 4 = -0.125;
    t3: 2 * 1.1 / 4 = 0.55. With num_tokens = 10 the same sum is divided by 10: 0.21."""
    ratios = T([[1.5, 0.5, 1.1, 0.7, 3.0]])
    old = torch.zeros(1, 5)
    logps = torch.log(ratios).requires_grad_(True)
    adv, mask = T([[1.0, 1.0, -2.0, -2.0, 1.0]]), T([[1, 1, 1, 1, 0]])
    loss, m = ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(0.525)
    assert m["clipfrac"] == 0.5 and m["ratio_mean"] == pytest.approx(0.95)
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    assert m["approx_kl"] == pytest.approx(0.097645, abs=1e-6)
    loss.backward()
    assert logps.grad is not None
    assert logps.grad[0].tolist() == pytest.approx([0.0, -0.125, 0.55, 0.0, 0.0])
    assert ppo_policy_loss(logps, old, adv, mask, clip_eps=0.2, num_tokens=10)[0].item() == pytest.approx(0.21)


def test_token_normalisation_makes_chunks_add_up_to_one_batch() -> None:
    """Two chunks, each normalised by the tokens of both (3 + 2 = 5), sum to the loss of the whole batch:
    this is what lets the optimize phase accumulate a minibatch in pieces."""
    torch.manual_seed(0)
    logps, old, adv = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    mask = T([[1, 1, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    whole, _ = ppo_policy_loss(logps, old, adv, mask)
    n = float(mask.sum())
    halves = sum(ppo_policy_loss(logps[s], old[s], adv[s], mask[s], num_tokens=n)[0] for s in (slice(0, 2), slice(2, 4)))
    assert float(halves) == pytest.approx(float(whole))
    v, ov, ret = torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3)
    vwhole, _ = ppo_value_loss(v, ov, ret, mask)
    vhalves = sum(ppo_value_loss(v[s], ov[s], ret[s], mask[s], num_tokens=n)[0] for s in (slice(0, 2), slice(2, 4)))
    assert float(vhalves) == pytest.approx(float(vwhole))


def test_grpo_clipping_acts_once_the_ratio_moves_by_hand() -> None:
    """Two completions, advantages (+1, -1); completion 1 has 2 tokens with ratios (1.5, 1.0), completion 2 one
    token with ratio 0.5 (its second position is padding). eps 0.2:
      c1 t1: max(-1.5, -1.2) = -1.2 clipped; c1 t2: -1.0; c2 t1: max(0.5, 0.8) = 0.8 clipped (A < 0, r < 0.8)
      loss = (-1.2 - 1.0 + 0.8) / 3 = -0.466667, clipfrac 2/3.
    eps 0.6 leaves every ratio inside [0.4, 1.6]: (-1.5 - 1.0 + 0.5) / 3 = -2/3, clipfrac 0 -- clip_eps matters.
    With ratio 1 everywhere (old == new, one optimizer step per rollout) clipfrac is 0 and approx_kl 0.
    ref - logp = 0.5 on every token: k3 = e^0.5 - 0.5 - 1 = 0.148721, adding 0.04 * 0.148721."""
    old = torch.full((2, 2), -1.0)
    logps = old + torch.log(T([[1.5, 1.0], [0.5, 1.0]]))
    adv, mask = T([1.0, -1.0]), T([[1, 1], [1, 0]])
    loss, m = grpo_loss(logps, old, None, adv, mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-1.4 / 3) and m["clipfrac"] == pytest.approx(2 / 3)
    assert m["ratio_min"] == pytest.approx(0.5) and m["ratio_max"] == pytest.approx(1.5)
    loss_wide, m_wide = grpo_loss(logps, old, None, adv, mask, clip_eps=0.6)
    assert loss_wide.item() == pytest.approx(-2 / 3) and m_wide["clipfrac"] == 0.0
    _, m_same = grpo_loss(old, old, None, adv, mask)
    assert m_same["clipfrac"] == 0.0 and m_same["approx_kl"] == 0.0 and m_same["ratio_mean"] == 1.0
    loss_kl, m_kl = grpo_loss(logps, old, logps + 0.5, adv, mask, clip_eps=0.2, kl_coef=0.04)
    assert loss_kl.item() == pytest.approx(-1.4 / 3 + 0.04 * (math.exp(0.5) - 1.5), abs=1e-6)
    assert m_kl["kl"] == pytest.approx(0.148721, abs=1e-6)


def test_whiten_ignores_padding() -> None:
    """Real entries (1, 3) -> mean 2, variance 1 -> (-1, 1); the padded 100 stays 0 and does not count."""
    out = masked_whiten(T([[1.0, 3.0, 100.0]]), T([[1, 1, 0]]))
    assert out.tolist() == [pytest.approx([-1.0, 1.0, 0.0], abs=1e-6)]


def test_rewards_and_advantages_shapes() -> None:
    assert grpo_advantages(T([2.0, 2.0]), group_size=2).tolist() == [0.0, 0.0]
    r, _ = ppo_token_rewards(T([1.0, 2.0]), torch.zeros(2, 2), torch.zeros(2, 2), T([[1, 0], [1, 1]]), kl_coef=0.1)
    assert r.tolist() == [[1.0, 0.0], [0.0, 2.0]]  # the score sits on each row's last real token
