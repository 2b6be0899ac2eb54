"""The engine's synchronous batch sampler: many prompts, one model, generated in the caller's thread through
the same batching loop (`tunelab.engine.batch.run_batch`), stop rule and decoding as the server's `Engine`.

`tunelab generate`/`chat`, `tunelab eval` and the RL rollouts call `sample`; the server's worker thread calls
`run_batch` directly. Both take their stop rule from `stop_rule` (the chat template's end-of-turn marker, see
`tunelab.data.templates.end_of_turn`) and their text from `decode`, so a prompt gives the same greedy text
whichever command runs it. No threads, no asyncio loop of its own; the model may be training between calls
(it is put in eval mode for the call and restored after).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Sequence as Seq
from dataclasses import dataclass
from typing import Any, cast

import torch

from tunelab.data.templates import EndOfTurn, end_of_turn, render_prompt_ids
from tunelab.engine.batch import Sequence, run_batch
from tunelab.engine.batch import _left_pad as left_pad
from tunelab.engine.types import EngineError, FinishReason, GenerationEvent, GenerationRequest, SamplingParams


@dataclass(frozen=True)
class Completion:
    """One generated sequence. `token_ids` are the generated tokens with the stop token last when one ended
    the sequence (what RL trains on); `text` is what the server would send (stop token and strings cut)."""

    text: str
    token_ids: list[int]
    finish_reason: FinishReason
    prompt_tokens: int
    logprobs: list[float] | None = None  # per token of token_ids, when sampling.logprobs


def stop_rule(tok: Any) -> EndOfTurn:
    """The stop rule of every generation path: the end-of-turn marker's token (or stop string) and EOS."""
    return end_of_turn(tok)


def with_stop_rule(sp: SamplingParams, rule: EndOfTurn) -> SamplingParams:
    """`sp` with the marker added to its stop strings when the marker is not a single token."""
    extra = tuple(s for s in rule.stop_strings if s not in sp.stop)
    return dataclasses.replace(sp, stop=sp.stop + extra) if extra else sp


def pad_id(tok: Any, rule: EndOfTurn) -> int:
    return int(tok.pad_token_id) if tok.pad_token_id is not None else min(rule.stop_ids, default=0)


def decode(tok: Any, ids: list[int]) -> str:
    """Generated ids to text, special tokens dropped: the text every path returns."""
    return str(tok.decode(ids, skip_special_tokens=True))


def chat_prompt_ids(tok: Any, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> list[int]:
    """A conversation rendered for generation, exactly as the server renders `messages` (and `tools`)."""
    return render_prompt_ids(tok, messages, tools)


@dataclass(eq=False)
class _Collected(Sequence):
    """A Sequence whose events are kept in a list instead of crossing to an event loop."""

    pieces: list[str] = dataclasses.field(default_factory=list)
    finish: FinishReason | None = None
    error: EngineError | None = None

    def push(self, item: GenerationEvent | EngineError) -> None:
        self.done = self.done or isinstance(item, EngineError) or bool(item.finish_reason)
        if isinstance(item, EngineError):
            self.error = item
            return
        self.pieces.append(item.text)
        self.finish = item.finish_reason or self.finish


_NO_LOOP = cast(asyncio.AbstractEventLoop, None)  # never used: _Collected.push does not cross threads


def _device(model: Any) -> torch.device:
    return next(model.parameters()).device  # type: ignore[no-any-return]


def sample(
    model: Any,
    tok: Any,
    prompts: Seq[list[int]],
    sampling: SamplingParams | Seq[SamplingParams],
    *,
    max_batch_size: int = 32,
) -> list[Completion]:
    """Generate one completion per prompt (token ids), in input order.

    Up to `max_batch_size` rows run together; as rows finish, waiting prompts join the running batch between
    two tokens (the server's continuous batching), so a long completion does not hold up the rest.
    """
    if isinstance(sampling, SamplingParams):
        sampling = [sampling] * len(prompts)
    if len(sampling) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(sampling)} sampling settings")
    if not prompts:
        return []
    rule = stop_rule(tok)
    seqs = [_Collected(GenerationRequest("local", with_stop_rule(sp, rule), prompt=list(p), request_id=str(i)),
                       list(p), None, _NO_LOOP, cast("asyncio.Queue[GenerationEvent | EngineError]", None))
            for i, (p, sp) in enumerate(zip(prompts, sampling, strict=True))]
    if any(not s.prompt_ids for s in seqs):
        raise ValueError("an empty prompt: give at least one token")
    for s in seqs:  # structured output: the same per-row grammar masks as the server's engine
        if (c := s.request.sampling.constraint) is not None:
            from tunelab.data.templates import tool_format
            from tunelab.engine import constrained

            fmt = tool_format(tok) if c.kind == "tool_call" else None
            s.constraint = constrained.build(tok, int(model.get_output_embeddings().weight.shape[0]),
                                             rule.stop_ids, c, fmt)
    waiting: deque[Sequence] = deque(seqs[max_batch_size:])

    def admit(running: list[Sequence]) -> list[Sequence]:
        room = max_batch_size - len(running)
        return [waiting.popleft() for _ in range(min(room, len(waiting)))] if running else []

    was_training = model.training
    model.eval()  # no dropout while generating
    try:
        with torch.no_grad():
            first: list[Sequence] = list(seqs[:max_batch_size])
            while True:
                run_batch(model, first, forward_kwargs=lambda rows: {}, decode=lambda ids: decode(tok, ids),
                          eos_ids=set(rule.stop_ids), pad_id=pad_id(tok, rule), device=_device(model), admit=admit)
                if not waiting:  # a batch that cannot take joiners (not a growing cache) ends with some left
                    break
                first = [waiting.popleft() for _ in range(min(max_batch_size, len(waiting)))]
    finally:
        model.train(was_training)
    out: list[Completion] = []
    for s in seqs:
        if s.error is not None:
            raise s.error
        ids = s.generated + ([s.stop_token] if s.stop_token is not None else [])
        out.append(Completion("".join(s.pieces), ids, s.finish or "length", len(s.prompt_ids),
                              list(s.logprobs) if s.request.sampling.logprobs else None))
    return out


def sample_chat(
    model: Any,
    tok: Any,
    conversations: Seq[list[dict[str, Any]]],
    sampling: SamplingParams | Seq[SamplingParams],
    *,
    max_batch_size: int = 32,
) -> list[Completion]:
    """`sample` for chat conversations (OpenAI-style message dicts), rendered with the chat template."""
    return sample(model, tok, [chat_prompt_ids(tok, list(c)) for c in conversations], sampling,
                  max_batch_size=max_batch_size)


@dataclass(frozen=True)
class RolloutBatch:
    """Sampled completions laid out for scoring them with one forward: (B, P + T) ids and attention mask with
    prompts left-padded to width P and completions right-padded to T; `completion_mask` (B, T) marks the
    completion tokens, the stop token included (the token RL trains to end on)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    completion_mask: torch.Tensor
    texts: list[str]
    completions: list[Completion]


def sample_rollouts(
    model: Any, tok: Any, prompts: Seq[list[int]], *, max_tokens: int, temperature: float, top_k: int = 0,
    max_batch_size: int = 64,
) -> RolloutBatch:
    """RL rollouts: one sampled completion per prompt, each row seeded from torch's global RNG (so a seeded
    run repeats), with per-token log-probs recorded."""
    seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
    params = [SamplingParams(max_tokens, temperature, top_k=top_k, seed=int(s), logprobs=True) for s in seeds]
    outs = sample(model, tok, prompts, params, max_batch_size=max_batch_size)
    rule = stop_rule(tok)
    dev = _device(model)
    ids, mask = left_pad([list(p) for p in prompts], pad_id(tok, rule), dev)
    width = max(len(o.token_ids) for o in outs)
    comp = torch.full((len(outs), width), pad_id(tok, rule), dtype=torch.long)
    cmask = torch.zeros((len(outs), width), dtype=torch.long)
    for i, o in enumerate(outs):
        comp[i, : len(o.token_ids)] = torch.tensor(o.token_ids, dtype=torch.long)
        cmask[i, : len(o.token_ids)] = 1
    comp, cmask = comp.to(dev), cmask.to(dev)
    return RolloutBatch(torch.cat([ids, comp], 1), torch.cat([mask, cmask], 1), ids.shape[1], cmask,
                        [o.text for o in outs], outs)
