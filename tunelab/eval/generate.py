"""Model-side evaluation: batched greedy generation for conversation prompts (through the engine's
synchronous sampler, the server's code path), and loss/perplexity on the reference answers. Works with any Hugging Face causal LM (plain or PEFT-wrapped) and its tokenizer; knows
nothing about metrics, files or configs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.records import Conversation
from tunelab.data.templates import IGNORE_INDEX, encode, encode_prompt
from tunelab.engine.sync import sample
from tunelab.engine.types import SamplingParams
from tunelab.errors import TunelabError
from tunelab.eval.config import GenerationSettings
from tunelab.eval.metrics import perplexity

Progress = Callable[[int], None]


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device  # type: ignore[no-any-return]
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def prompt_ids(tok: Any, conv: Conversation, system_prompt: str | None = None) -> list[int]:
    """The conversation up to (not including) its last assistant turn, rendered with the generation prompt."""
    msgs = list(conv.prompt)
    if not msgs:
        raise TunelabError("an evaluation example has no prompt before its assistant answer")
    return encode_prompt(tok, msgs, system_prompt)


def generate(
    model: Any,
    tok: Any,
    conversations: Sequence[Conversation],
    settings: GenerationSettings | None = None,
    *,
    system_prompt: str | None = None,
    progress: Progress | None = None,
) -> list[str]:
    """Greedy completions, one per conversation, in input order: the engine's synchronous sampler
    (`tunelab.engine.sync`), so the text is what `tunelab serve` and `tunelab generate` give for the same
    prompt (same template, end-of-turn stop rule and decoding), returned as is.

    Conversations go in chunks of `settings.batch_size` (for progress reports); inside a chunk the engine
    batches rows and lets waiting ones join as others finish.
    """
    settings = settings or GenerationSettings()
    encoded = [prompt_ids(tok, c, system_prompt) for c in conversations]
    params = SamplingParams(settings.max_new_tokens, temperature=0.0,
                            repetition_penalty=settings.repetition_penalty)
    outputs: list[str] = []
    for start in range(0, len(encoded), settings.batch_size):
        chunk = encoded[start : start + settings.batch_size]
        outputs += [c.text for c in sample(model, tok, chunk, params, max_batch_size=settings.batch_size)]
        if progress:
            progress(len(chunk))
    return outputs


@dataclass(frozen=True)
class LossResult:
    loss: float
    """Mean cross-entropy (nats) over all reference-answer tokens of all examples."""
    perplexity: float
    tokens: int
    per_example: list[float]


@torch.no_grad()
def reference_loss(
    model: Any,
    tok: Any,
    conversations: Sequence[Conversation],
    *,
    system_prompt: str | None = None,
    batch_size: int = 8,
    max_len: int | None = 2048,
    progress: Progress | None = None,
) -> LossResult:
    """Loss and perplexity of the reference answers given their prompts: only the last assistant turn's
    tokens (including its end-of-turn token) count, exactly the tokens training puts loss on."""
    encs = [encode(tok, c, train_on="last_assistant", max_len=max_len, system_prompt=system_prompt) for c in conversations]
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    device = _device(model)
    was_training = model.training
    model.eval()
    per_sum = [0.0] * len(encs)
    per_n = [0] * len(encs)
    try:
        for start in range(0, len(encs), batch_size):
            chunk = encs[start : start + batch_size]
            width = max(len(e.input_ids) for e in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, e in enumerate(chunk):
                n = len(e.input_ids)
                ids[row, :n] = torch.tensor(e.input_ids)
                labels[row, :n] = torch.tensor(e.labels)
                mask[row, :n] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
            # Position t predicts token t+1.
            tgt = labels[:, 1:].to(device)
            ce = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), tgt, ignore_index=IGNORE_INDEX, reduction="none"
            )
            valid = tgt != IGNORE_INDEX
            for row in range(len(chunk)):
                per_sum[start + row] = float(ce[row][valid[row]].sum())
                per_n[start + row] = int(valid[row].sum())
            if progress:
                progress(len(chunk))
    finally:
        model.train(was_training)
    total_n = sum(per_n)
    loss = sum(per_sum) / total_n if total_n else math.nan
    per_example = [s / n if n else math.nan for s, n in zip(per_sum, per_n, strict=True)]
    return LossResult(loss, perplexity(loss), total_n, per_example)
