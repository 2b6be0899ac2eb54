"""Losses as pure functions of tensors: each returns `(loss, metrics)` and knows nothing about models,
data loading or optimizers. Hand-checked in tests/unit/test_losses*.py.

Token losses are *sums* divided by a caller-given normaliser (`num_items`), not per-batch means: the loop
passes the number of trained tokens in the whole optimizer step (all micro-batches, all processes), which
makes gradient accumulation and data parallelism exactly equivalent to one big batch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def sft_loss(
    logits: torch.Tensor, targets: torch.Tensor, num_items: float
) -> tuple[torch.Tensor, dict[str, float]]:
    """Cross-entropy over already-aligned (logits[i] predicts targets[i]) trained positions.

    logits: (N, V) for the N kept positions; targets: (N,) with IGNORE_INDEX for positions not trained.
    Returns (sum of token losses / num_items, metrics with the unnormalised sums so callers can aggregate).
    """
    logits = logits.float()
    loss_sum = F.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    mask = targets != IGNORE_INDEX
    with torch.no_grad():
        correct = ((logits.argmax(-1) == targets) & mask).sum().item()
    n = int(mask.sum().item())
    return loss_sum / num_items, {"loss_sum": float(loss_sum.item()), "tokens": n, "correct": float(correct)}


def token_logps(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(logits)[target] per position, in fp32; 0 where the target is IGNORE_INDEX.
    logits (N, V), targets (N,). The reference for `linear_logps`."""
    safe = targets.clamp(min=0)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return logp * (targets != IGNORE_INDEX)


def segment_sums(
    logp: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-position log-probs (N,) summed per segment (sequence), and the trained-token count per segment."""
    mask = (targets != IGNORE_INDEX).to(logp.dtype)
    sums = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device).index_add(0, segment_ids, logp)
    counts = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device).index_add(0, segment_ids, mask)
    return sums, counts


def sequence_logps(
    logits: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor, num_segments: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of log-probabilities of the trained targets per segment (sequence), and the token count per segment.

    logits (N, V), targets (N,) with IGNORE_INDEX, segment_ids (N,) in [0, num_segments). What every
    preference method (DPO, ORPO, SimPO, KTO) scores on packed rows; they compute it with `linear_logps`
    (no whole logits) where the head allows.
    """
    return segment_sums(token_logps(logits, targets), targets, segment_ids, num_segments)


class _LinearCrossEntropy(torch.autograd.Function):
    """`sft_loss(hidden @ weight.T, targets, num_items)` computed `chunk` rows at a time, so the (N, V) fp32
    logits never exist whole. The gradients are worked out in the forward pass, chunk by chunk (the loss is
    a scalar at the end of the graph: d loss / d logits = (softmax - onehot) / num_items), and only the
    (N, H) gradient of `hidden` (and of `weight`, when it trains) is kept: the FLOPs are those of the
    unchunked loss, with no recomputation in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_items: float, chunk: int,
        compute_dtype: torch.dtype, need_h: bool, need_w: bool, compiled: bool,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.long, device=hidden.device)
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(compute_dtype)
        fused = _compiled_chunk() if compiled else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                h = hidden[s : s + chunk].to(compute_dtype)
                t = targets[s : s + chunk]
                if fused is not None:
                    ls, c, g16 = fused(h, w, t, 1.0 / num_items)
                    loss_sum += ls
                    correct += c
                    if grad_h is not None:
                        grad_h[s : s + chunk] = g16 @ w
                    if grad_w is not None:
                        grad_w += (g16.t() @ h).float()
                    continue
                valid = t != IGNORE_INDEX
                safe = t.clamp(min=0).unsqueeze(-1)
                logits = (h @ w.t()).float()  # the reference's logits: matmul in compute_dtype, loss in fp32
                lse = torch.logsumexp(logits, dim=-1)
                loss_sum += ((lse - logits.gather(-1, safe).squeeze(-1)) * valid).sum()
                correct += ((logits.argmax(-1) == t) & valid).sum()
                if grad_h is None and grad_w is None:
                    continue
                g = logits.sub_(lse.unsqueeze(-1)).exp_()  # softmax, in place
                g.scatter_add_(-1, safe, torch.full_like(lse, -1.0).unsqueeze(-1))
                g.mul_((valid.to(g.dtype) / num_items).unsqueeze(-1))
                g16 = g.to(compute_dtype)
                if grad_h is not None:
                    grad_h[s : s + chunk] = g16 @ w
                if grad_w is not None:
                    grad_w += (g16.t() @ h).float()
        ctx.save_for_backward(*(x for x in (grad_h, grad_w) if x is not None))
        ctx.has = (grad_h is not None, grad_w is not None)
        ctx.weight_dtype = weight.dtype
        raw = loss_sum.clone()
        ctx.mark_non_differentiable(raw, correct)
        return loss_sum / num_items, raw, correct

    @staticmethod
    def backward(ctx: Any, grad_loss: torch.Tensor, *_: Any) -> tuple[Any, ...]:
        saved = list(ctx.saved_tensors)
        gh = gw = None
        if ctx.has[0]:
            g = saved.pop(0)
            gh = g * grad_loss.to(g.dtype)
        if ctx.has[1]:
            gw = (saved.pop(0) * grad_loss.float()).to(ctx.weight_dtype)
        return gh, gw, None, None, None, None, None, None, None


def _chunk_loss_grad(
    h: torch.Tensor, w: torch.Tensor, t: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One chunk written for torch.compile (out of place; inductor fuses it into a few passes over the logits):
    (loss sum, correct count, d loss / d logits in h's dtype)."""
    logits = (h @ w.t()).float()
    valid = t != IGNORE_INDEX
    safe = t.clamp(min=0)
    lse = torch.logsumexp(logits, dim=-1)
    loss = ((lse - logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)) * valid).sum()
    correct = ((logits.argmax(-1) == t) & valid).sum()
    onehot = F.one_hot(safe, logits.shape[-1]).to(logits.dtype)
    g = (torch.exp(logits - lse.unsqueeze(-1)) - onehot) * (valid.to(logits.dtype) * scale).unsqueeze(-1)
    return loss, correct, g.to(h.dtype)


_COMPILED: list[Any] = []


def _compiled_chunk() -> Any:
    if not _COMPILED:
        _COMPILED.append(torch.compile(_chunk_loss_grad, dynamic=True))
    return _COMPILED[0]


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, num_items: float, chunk: int = 1024,
    compiled: bool = False,
) -> tuple[torch.Tensor, dict[str, float]]:
    """`sft_loss` of the logits `hidden @ weight.T` (an LM head without bias), `chunk` positions at a time:
    the same loss, gradients (of `hidden` and of `weight`) and metrics, without the (N, V) fp32 logits.

    hidden: (N, H) final hidden states at the kept positions; weight: (V, H); targets: (N,) with IGNORE_INDEX.
    Under autocast the logits are computed in the autocast dtype, as `F.linear` would. `compiled`: each chunk
    runs through torch.compile (inductor), a fixed compile time for faster steps (`train.compile`).
    """
    dev = hidden.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    grad = torch.is_grad_enabled()
    loss, loss_sum, correct = _LinearCrossEntropy.apply(
        hidden, weight, targets, float(num_items), max(1, chunk), compute,
        grad and hidden.requires_grad, grad and weight.requires_grad, compiled)
    n = int((targets != IGNORE_INDEX).sum().item())
    return loss, {"loss_sum": float(loss_sum.item()), "tokens": n, "correct": float(correct.item())}


class _LinearLogps(torch.autograd.Function):
    """`token_logps(hidden @ weight.T, targets)`, `chunk` rows at a time, without the (N, V) logits.

    A position's log-prob depends on its own hidden row only, so its gradient with respect to that row is one
    vector, d logp_t / d h_t = (onehot(y_t) - softmax_t) @ W: the forward pass works it out chunk by chunk and
    keeps it (N, H), and backward is one multiply by the incoming per-position gradient. When the weight
    trains too (a tied or trained head), its gradient needs that incoming gradient, so backward recomputes
    each chunk's softmax instead."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int,
        compute_dtype: torch.dtype, need_h: bool, need_w: bool,
    ) -> torch.Tensor:
        out = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        jac = torch.empty_like(hidden) if need_h and not need_w else None
        w = weight.to(compute_dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                t = targets[s : s + chunk]
                valid = t != IGNORE_INDEX
                safe = t.clamp(min=0).unsqueeze(-1)
                logits = (hidden[s : s + chunk].to(compute_dtype) @ w.t()).float()
                lse = torch.logsumexp(logits, dim=-1)
                out[s : s + chunk] = (logits.gather(-1, safe).squeeze(-1) - lse) * valid
                if jac is not None:
                    g = logits.sub_(lse.unsqueeze(-1)).exp_().neg_()  # -softmax, in place
                    g.scatter_add_(-1, safe, torch.ones_like(lse).unsqueeze(-1))  # onehot - softmax
                    g.mul_(valid.to(g.dtype).unsqueeze(-1))
                    jac[s : s + chunk] = (g.to(compute_dtype) @ w).to(jac.dtype)
        if jac is not None:
            ctx.save_for_backward(jac)
        elif need_h or need_w:
            ctx.save_for_backward(hidden, weight, targets)
        ctx.flags = (need_h, need_w, jac is not None, chunk, compute_dtype)
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: torch.Tensor) -> tuple[Any, ...]:
        need_h, need_w, has_jac, chunk, compute = ctx.flags
        if has_jac:
            (jac,) = ctx.saved_tensors
            return jac * grad_out.unsqueeze(-1).to(jac.dtype), None, None, None, None, None, None
        hidden, weight, targets = ctx.saved_tensors
        gh = torch.empty_like(hidden) if need_h else None
        gw = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        w = weight.to(compute)
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, hidden.shape[0], chunk):
                t = targets[s : s + chunk]
                safe = t.clamp(min=0).unsqueeze(-1)
                h = hidden[s : s + chunk].to(compute)
                logits = (h @ w.t()).float()
                g = logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True)).exp_().neg_()
                g.scatter_add_(-1, safe, torch.ones_like(safe, dtype=g.dtype))
                g.mul_((grad_out[s : s + chunk].float() * (t != IGNORE_INDEX)).unsqueeze(-1))
                g16 = g.to(compute)
                if gh is not None:
                    gh[s : s + chunk] = (g16 @ w).to(gh.dtype)
                if gw is not None:
                    gw += (g16.t() @ h).float()
        return gh, None if gw is None else gw.to(weight.dtype), None, None, None, None, None


def linear_logps(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int = 256) -> torch.Tensor:
    """`token_logps(hidden @ weight.T, targets)`: each position's log-prob of its target (fp32, 0 where
    ignored), `chunk` positions at a time, so the (N, V) logits never exist whole; differentiable in `hidden`
    and `weight`. Under autocast the logits are computed in the autocast dtype, as `F.linear` would."""
    dev = hidden.device.type
    compute = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else hidden.dtype
    grad = torch.is_grad_enabled()
    out: torch.Tensor = _LinearLogps.apply(hidden, weight, targets, max(1, chunk), compute,
                                           grad and hidden.requires_grad, grad and weight.requires_grad)
    return out
