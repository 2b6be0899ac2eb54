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

SEED_SPACE = 2**64  # what torch.Generator.manual_seed accepts (as an unsigned 64-bit number)


def make_generator(params: SamplingParams, device: torch.device) -> torch.Generator | None:
    if params.temperature == 0:
        return None
    g = torch.Generator(device=device)
    # The server bounds seeds; other callers' seeds are folded into torch's range rather than raising mid-batch.
    g.manual_seed(params.seed % SEED_SPACE if params.seed is not None else secrets.randbits(63))
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
        picks[i] = sample_row(logits[i], sp, gen)
    return picks


def sample_row(logits: torch.Tensor, sp: SamplingParams, gen: torch.Generator) -> int:
    """One sampling row's next token from its (vocab,) logits."""
    row = logits.float() / sp.temperature
    if 0 < sp.top_k < row.shape[-1]:
        kth = row.topk(sp.top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    probs = top_p_filter(torch.softmax(row, dim=-1), sp.top_p)
    return int(torch.multinomial(probs, 1, generator=gen).item())


def penalize_row(logits: torch.Tensor, seen: list[int], penalty: float) -> torch.Tensor:
    """A copy of one row's (vocab,) logits with the already-seen tokens penalized (HF's repetition penalty)."""
    out = logits.clone()
    if penalty == 1.0 or not seen:
        return out
    idx = torch.tensor(sorted(set(seen)), dtype=torch.long, device=logits.device)
    vals = out[idx]
    out[idx] = torch.where(vals < 0, vals * penalty, vals / penalty)
    return out


def chosen_logprob(logits: torch.Tensor, token: int) -> float:
    """log p(token) under the softmax of one row's (vocab,) logits, in fp32."""
    return float(torch.log_softmax(logits.float(), dim=-1)[token])
