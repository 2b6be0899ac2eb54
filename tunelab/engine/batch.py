"""One running batch: left-padded prefill, then a token at a time with a KV cache, rows leaving as they
finish or are cancelled and new ones joining between tokens (their cache is prefilled apart, then padded
and concatenated). Knows nothing about adapters beyond the per-row names it forwards to PEFT.

A sequence's output goes to its asyncio queue on the server's event loop (thread-safe hand-off), so the
worker thread never blocks on a slow client.

Failures stay with their row: an exception while preparing, sampling or recording one row ends that row
alone with an error; a failed forward pass ends the rows it covered (a joiners' prefill fails only the
joiners); and every row that entered the batch always gets a final event or an error, never silence.
The exception goes to the log with the row's request id; the client's error says only that id.

A row with a constraint (structured output, a forced tool call) has its logits masked by its grammar
(tunelab.engine.constrained) before its token is picked, and the grammar consumes the token after; other
rows of the batch are untouched.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.data.templates import ToolFormat
from tunelab.engine.sampling import chosen_logprob, make_generator, penalize_row, sample_row
from tunelab.engine.text import StopMatcher
from tunelab.engine.types import EngineError, FinishReason, GenerationEvent, GenerationRequest

log = logging.getLogger(__name__)


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
    stop_token: int | None = None  # the end-of-turn/EOS token that finished it, if one did
    logprobs: list[float] = field(default_factory=list)  # per token (stop token last) when sampling.logprobs
    constraint: Any = None  # a tunelab.engine.constrained.RowConstraint when the output follows a grammar

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

    def __init__(self, seq: Sequence, prompt_tokens: int, tool_format: ToolFormat | None = None) -> None:
        self._seq = seq
        self.request_id = seq.request.request_id
        self.prompt_tokens = prompt_tokens
        self.tool_format = tool_format

    @property
    def token_ids(self) -> list[int]:
        """Tokens generated so far (EOS excluded); for tests and benchmarks."""
        return list(self._seq.generated)

    @property
    def logprobs(self) -> list[float]:
        """Log-prob of each generated token (the stop token last) when the request asked for them."""
        return list(self._seq.logprobs)

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


@dataclass(eq=False)
class _Running:
    """The rows of a running batch and their state: KV cache, attention mask (its length is the cache's),
    each row's last position, its sampler, and the logits or the tokens picked for the next forward."""

    rows: list[Sequence]
    gens: list[torch.Generator | None]
    cache: Any
    mask: torch.Tensor
    last_pos: torch.Tensor
    logits: torch.Tensor
    picks: list[int] = field(default_factory=list)


def fail_row(seq: Sequence, error: BaseException, what: str) -> None:
    """End one row with an error: the exception goes to the log under the row's request id, the client gets
    only that id."""
    rid = seq.request.request_id
    log.error("request %s: %s failed", rid, what, exc_info=error)
    if not seq.done:
        seq.push(EngineError(f"generation failed for request {rid}; the server log has the details",
                             code="generation_failed"))


def _prefill(
    model: Any, rows: list[Sequence], forward_kwargs: Callable[[list[Sequence]], dict[str, Any]], pad_id: int,
    device: torch.device,
) -> _Running | None:
    """Prefill `rows` together; None when no row is left (a row whose sampler cannot be built fails alone)."""
    gens: list[torch.Generator | None] = []
    ready: list[Sequence] = []
    for s in rows:
        try:
            gens.append(make_generator(s.request.sampling, device))
            ready.append(s)
        except Exception as e:
            fail_row(s, e, "setting up its sampler")
    if not ready:
        return None
    ids, mask = _left_pad([s.prompt_ids for s in ready], pad_id, device)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, logits_to_keep=1,
                **forward_kwargs(ready))
    return _Running(ready, gens, out.past_key_values, mask, positions[:, -1], out.logits[:, -1, :])


def _pick_one(state: _Running, i: int, greedy: list[int], eos_ids: set[int],
              decode: Callable[[list[int]], str]) -> tuple[bool, int]:
    """(keep the row, its token): pick row i's token and record it; an exception fails that row alone."""
    seq, gen = state.rows[i], state.gens[i]
    if seq.cancelled.is_set():
        return False, 0
    try:
        sp = seq.request.sampling
        logits, best = state.logits[i], greedy[i]
        if sp.repetition_penalty != 1.0:
            logits = penalize_row(logits, seq.prompt_ids + seq.generated, sp.repetition_penalty)
            best = int(logits.argmax())
        if seq.constraint is not None:
            logits = seq.constraint.mask(logits)
            best = int(logits.argmax())
        tok = best if sp.temperature == 0 or gen is None else sample_row(logits, sp, gen)
        if seq.constraint is not None and tok not in eos_ids:
            seq.constraint.consume(tok)
        if sp.logprobs:  # the model's own distribution (before temperature and penalties), as HF's raw logits
            seq.logprobs.append(chosen_logprob(state.logits[i], tok))
        return _advance(seq, tok, eos_ids, decode) is None, tok
    except Exception as e:
        fail_row(seq, e, "picking its next token")
        return False, 0


def _pick_and_advance(
    state: _Running, eos_ids: set[int], decode: Callable[[list[int]], str], device: torch.device
) -> int:
    """Pick each row's next token, send its text, and drop the rows that finished, failed or were cancelled."""
    greedy: list[int] = state.logits.argmax(dim=-1).tolist()
    picked = [_pick_one(state, i, greedy, eos_ids, decode) for i in range(len(state.rows))]
    keep = [i for i, (kept, _) in enumerate(picked) if kept]
    picks = [tok for _, tok in picked]
    produced = len(state.rows)
    if len(keep) < len(state.rows):
        if keep:
            index = torch.tensor(keep, device=device)
            state.cache.batch_select_indices(index)
            state.mask, state.last_pos = state.mask[index], state.last_pos[index]
        state.rows, state.gens = [state.rows[i] for i in keep], [state.gens[i] for i in keep]
    state.picks = [picks[i] for i in keep]
    return produced


def _joinable(cache: Any) -> bool:
    # Joining pads caches along the sequence axis; only plain growing caches (exactly DynamicLayer: not its sliding-window,
    # quantised or static kin) can be padded that way.
    layers: list[Any] = list(getattr(cache, "layers", None) or [])
    from transformers.cache_utils import DynamicLayer

    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def _join(state: _Running, new: _Running) -> None:
    """Append `new`'s rows to `state`, left-padding the shorter cache and mask to a common length."""
    t1, t2 = state.mask.shape[1], new.mask.shape[1]
    width = max(t1, t2)
    for a, b in zip(state.cache.layers, new.cache.layers, strict=True):
        a.keys = torch.cat([F.pad(a.keys, (0, 0, width - t1, 0)), F.pad(b.keys, (0, 0, width - t2, 0))])
        a.values = torch.cat([F.pad(a.values, (0, 0, width - t1, 0)), F.pad(b.values, (0, 0, width - t2, 0))])
    state.mask = torch.cat([F.pad(state.mask, (width - t1, 0)), F.pad(new.mask, (width - t2, 0))])
    state.last_pos = torch.cat([state.last_pos, new.last_pos])
    state.rows += new.rows
    state.gens += new.gens
    state.picks += new.picks


def run_batch(
    model: Any,
    seqs: list[Sequence],
    *,
    forward_kwargs: Callable[[list[Sequence]], dict[str, Any]],
    decode: Callable[[list[int]], str],
    eos_ids: set[int],
    pad_id: int,
    device: torch.device,
    admit: Callable[[list[Sequence]], list[Sequence]] | None = None,
) -> int:
    """Generate every sequence to completion; returns the number of tokens generated.

    `forward_kwargs(rows)` gives extra arguments for a forward over those rows (PEFT's `adapter_names`).
    `admit(running_rows)`, called between tokens, returns new sequences to join the batch (continuous
    batching): they are prefilled on their own, then their KV cache is joined to the running one.
    """
    rows = [s for s in seqs if not s.cancelled.is_set()]
    if not rows:
        return 0
    admitted = list(rows)  # every row that entered: each must end with a final event or an error
    produced = 0
    try:
        state = _prefill(model, rows, forward_kwargs, pad_id, device)
        if state is None:
            return 0
        if not _joinable(state.cache):
            admit = None
        while True:
            produced += _pick_and_advance(state, eos_ids, decode, device)
            joiners = admit(state.rows) if admit is not None else []
            joiners = [s for s in joiners if not s.cancelled.is_set()]
            admitted += joiners
            new = _prefill_joiners(model, joiners, forward_kwargs, pad_id, device) if joiners else None
            if new is not None:
                produced += _pick_and_advance(new, eos_ids, decode, device)
                if not state.rows:
                    state = new
                elif new.rows:
                    _join(state, new)
            if not state.rows:
                return produced
            state.mask = torch.cat([state.mask, state.mask.new_ones((len(state.rows), 1))], dim=-1)
            state.last_pos = state.last_pos + 1
            step = torch.tensor(state.picks, dtype=torch.long, device=device)[:, None]
            out = model(input_ids=step, attention_mask=state.mask, position_ids=state.last_pos[:, None],
                        past_key_values=state.cache, use_cache=True, **forward_kwargs(state.rows))
            state.cache = out.past_key_values
            state.logits = out.logits[:, -1, :]
    except Exception as e:
        # A forward over several rows failed: which row caused it cannot be told, so the rows still running end.
        for seq in admitted:
            if not seq.done:
                fail_row(seq, e, "the batch's forward pass")
        return produced


def _prefill_joiners(
    model: Any, joiners: list[Sequence], forward_kwargs: Callable[[list[Sequence]], dict[str, Any]], pad_id: int,
    device: torch.device,
) -> _Running | None:
    """The joiners' own prefill: if it fails, only the joiners fail; the running batch goes on."""
    try:
        return _prefill(model, joiners, forward_kwargs, pad_id, device)
    except Exception as e:
        for seq in joiners:
            fail_row(seq, e, "its prefill (joining a running batch)")
        return None


def _advance(seq: Sequence, tok: int, eos_ids: set[int], decode: Callable[[list[int]], str]) -> FinishReason | None:
    """Record one token for `seq`, send what text is safe to send; return a finish reason when done."""
    sp = seq.request.sampling
    if tok in eos_ids:
        seq.stop_token = tok
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
