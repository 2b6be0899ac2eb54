"""One running batch: left-padded prefill, then a token at a time with a KV cache, rows leaving as they
finish or are cancelled. Knows nothing about adapters beyond the per-row names it forwards to PEFT.

A sequence's output goes to its asyncio queue on the server's event loop (thread-safe hand-off), so the
worker thread never blocks on a slow client.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tunelab.engine.sampling import make_generator, pick_tokens
from tunelab.engine.text import StopMatcher
from tunelab.engine.types import EngineError, FinishReason, GenerationEvent, GenerationRequest


@dataclass(eq=False)
class Sequence:
    """One request inside the engine. `adapter` is the served adapter name, None for the base model."""

    request: GenerationRequest
    prompt_ids: list[int]
    adapter: str | None
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[GenerationEvent | EngineError]
    generated: list[int] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)
    done: bool = False

    def __post_init__(self) -> None:
        self.matcher = StopMatcher(self.request.sampling.stop)

    def push(self, item: GenerationEvent | EngineError) -> None:
        if isinstance(item, EngineError) or item.finish_reason:
            self.done = True
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone: nobody is listening any more
            self.cancelled.set()


class EngineStream:
    """The GenerationStream handed to the server for one Sequence."""

    def __init__(self, seq: Sequence, prompt_tokens: int) -> None:
        self._seq = seq
        self.request_id = seq.request.request_id
        self.prompt_tokens = prompt_tokens

    @property
    def token_ids(self) -> list[int]:
        """Tokens generated so far (EOS excluded); for tests and benchmarks."""
        return list(self._seq.generated)

    def cancel(self) -> None:
        self._seq.cancelled.set()

    async def __aiter__(self) -> AsyncIterator[GenerationEvent]:
        finished = False
        try:
            while True:
                item = await self._seq.queue.get()
                if isinstance(item, EngineError):
                    finished = True
                    raise item
                yield item
                if item.finish_reason:
                    finished = True
                    return
        finally:
            if not finished:
                self.cancel()  # the consumer stopped early (client gone): stop generating


def _left_pad(rows: list[list[int]], pad_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - len(r) :] = torch.tensor(r, dtype=torch.long)
        mask[i, width - len(r) :] = 1
    return ids.to(device), mask.to(device)


def run_batch(
    model: Any,
    seqs: list[Sequence],
    *,
    forward_kwargs: Callable[[list[Sequence]], dict[str, Any]],
    decode: Callable[[list[int]], str],
    eos_ids: set[int],
    pad_id: int,
    device: torch.device,
) -> int:
    """Generate every sequence to completion; returns the number of tokens generated.

    `forward_kwargs(rows)` gives extra arguments for a forward over those rows (PEFT's `adapter_names`).
    """
    rows = [s for s in seqs if not s.cancelled.is_set()]
    if not rows:
        return 0
    ids, mask = _left_pad([s.prompt_ids for s in rows], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    gens = [make_generator(s.request.sampling, device) for s in rows]
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **forward_kwargs(rows))
    cache = out.past_key_values
    logits = out.logits[:, -1, :]
    last_pos = positions[:, -1]
    produced = 0
    while True:
        picks = pick_tokens(logits, [s.request.sampling for s in rows], gens)
        keep: list[int] = []
        for i, (seq, tok) in enumerate(zip(rows, picks, strict=True)):
            produced += 1
            if seq.cancelled.is_set():
                continue
            reason = _advance(seq, tok, eos_ids, decode)
            if reason is None:
                keep.append(i)
        if not keep:
            return produced
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.batch_select_indices(index)
            mask, last_pos = mask[index], last_pos[index]
            rows, gens = [rows[i] for i in keep], [gens[i] for i in keep]
            picks = [picks[i] for i in keep]
        mask = torch.cat([mask, mask.new_ones((len(rows), 1))], dim=-1)
        last_pos = last_pos + 1
        step = torch.tensor(picks, dtype=torch.long, device=device)[:, None]
        out = model(input_ids=step, attention_mask=mask, position_ids=last_pos[:, None], past_key_values=cache,
                    use_cache=True, **forward_kwargs(rows))
        cache = out.past_key_values
        logits = out.logits[:, -1, :]


def _advance(seq: Sequence, tok: int, eos_ids: set[int], decode: Callable[[list[int]], str]) -> FinishReason | None:
    """Record one token for `seq`, send what text is safe to send; return a finish reason when done."""
    sp = seq.request.sampling
    if tok in eos_ids:
        n = len(seq.generated) + 1
        seq.push(GenerationEvent(seq.matcher.flush(), n, "stop"))
        return "stop"
    seq.generated.append(tok)
    n = len(seq.generated)
    piece, stopped = seq.matcher.update(decode(seq.generated))
    if stopped:
        seq.push(GenerationEvent(piece, n, "stop"))
        return "stop"
    if n >= sp.max_tokens:
        seq.push(GenerationEvent(piece + seq.matcher.flush(), n, "length"))
        return "length"
    if piece:
        seq.push(GenerationEvent(piece, n))
    return None
