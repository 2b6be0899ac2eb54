"""Choosing the next token for each row of a batch, each row with its own temperature, top_k, top_p and seed.

Greedy rows (temperature 0) take the argmax; sampling rows draw from the tempered, top-k and nucleus-filtered
distribution (HF's order) with their own `torch.Generator`, so a seeded request repeats whatever else is in
the batch. A repetition penalty (HF's rule: divide positive logits, multiply negative ones, for every token
already in the prompt or the output) applies before either.
"""

from __future__ import annotations

import secrets

import torch

from tunelab.engine.types import SamplingParams


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else secrets.randbits(63))
    return g


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero out the tail of a 1-D distribution beyond cumulative mass `top_p` (the top token always stays)."""
    if top_p >= 1.0:
        return probs
    sorted_probs, order = probs.sort(descending=True)
    # Drop a token when the mass of the tokens before it already reaches top_p.
    drop = (sorted_probs.cumsum(-1) - sorted_probs) >= top_p
    sorted_probs = sorted_probs.masked_fill(drop, 0.0)
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def pick_tokens(
    logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """logits: (batch, vocab). Returns one token id per row."""
    picks: list[int] = logits.argmax(dim=-1).tolist()
    for i, (sp, gen) in enumerate(zip(params, generators, strict=True)):
        if sp.temperature == 0 or gen is None:
            continue
        row = logits[i].float() / sp.temperature
        if 0 < sp.top_k < row.shape[-1]:
            kth = row.topk(sp.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        probs = top_p_filter(probs, sp.top_p)
        picks[i] = int(torch.multinomial(probs, 1, generator=gen).item())
    return picks


def penalize_repeats(logits: torch.Tensor, seen: list[list[int]], params: list[SamplingParams]) -> torch.Tensor:
    """A copy of logits (batch, vocab) with each row's already-seen tokens penalized by its repetition_penalty."""
    out = logits.clone()
    for i, (ids, sp) in enumerate(zip(seen, params, strict=True)):
        if sp.repetition_penalty == 1.0 or not ids:
            continue
        idx = torch.tensor(sorted(set(ids)), dtype=torch.long, device=logits.device)
        vals = out[i, idx]
        out[i, idx] = torch.where(vals < 0, vals * sp.repetition_penalty, vals / sp.repetition_penalty)
    return out


def chosen_logprobs(logits: torch.Tensor, picks: list[int]) -> list[float]:
    """log p(pick) per row under the softmax of `logits` (in fp32)."""
    idx = torch.tensor(picks, dtype=torch.long, device=logits.device)[:, None]
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, idx).squeeze(-1).tolist()  # type: ignore[no-any-return]
