"""Data mixing (the guide's mitigation against catastrophic forgetting): general examples drawn into training.

`data.mix.fraction` of the final training set comes from `data.mix.path`. With `answers: self` the drawn
prompts are answered by the base model itself (greedy, through the one generation path, before any weight
changes) and those answers are trained on instead of the file's: self-distillation replay. Training on a general
set's reference answers teaches new behaviour (on the demo's terse "reply with the number only" answers a 135M
model lost most of its general accuracy, because it stopped working the answer out first); the model's own
answers teach nothing new, so they only hold it in place while the task is learned. The answers are written to
the run folder once, so a resumed run trains on exactly the same examples.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

from tunelab.config import DataMix
from tunelab.data.readers import read_records
from tunelab.data.records import Conversation, Message, Record
from tunelab.errors import TunelabError


def draw(mix: DataMix, n_task: int, expect: str, seed: int) -> list[Record]:
    """The general records to add to `n_task` task examples so that they make `mix.fraction` of the whole."""
    general = read_records(mix.path, expect=expect)
    # fraction f of the final training set comes from the general data: g = f / (1 - f) * n
    want = round(mix.fraction / (1 - mix.fraction) * n_task)
    rng = random.Random(seed)
    return rng.sample(general, want) if want <= len(general) else [rng.choice(general) for _ in range(want)]


def _prompt(rec: Record, path: str) -> tuple[Message, ...]:
    if not isinstance(rec, Conversation) or not any(m.role == "assistant" for m in rec.messages):
        raise TunelabError(f"{path}: data.mix.answers: self needs chat examples that end with an assistant answer", 2)
    return rec.prompt


def self_answers(picks: list[Record], mix: DataMix, model: Any, tok: Any, system_prompt: str | None,
                 out: Path, expect: str, log: Any = None) -> list[Record]:
    """`picks` with each last assistant answer replaced by the base model's own (cut answers dropped), read back
    from `out` when an earlier attempt of this run wrote it."""
    if out.is_file():
        return read_records(out, expect=expect)
    if model is None:
        raise TunelabError("data.mix.answers: self needs the base model to answer the general prompts", 2)
    from tunelab.generate import Generator

    prompts: dict[tuple[Message, ...], None] = {}
    for r in picks:
        prompts.setdefault(_prompt(r, mix.path))
    gen = Generator(model, tok, "base", system_prompt)
    order = list(prompts)
    done = gen.generate([[m.template_dict() for m in p] for p in order], max_tokens=mix.max_new_tokens)
    answer = {p: c.text.strip() for p, c in zip(order, done, strict=True) if c.finish_reason == "stop" and c.text.strip()}
    kept: list[Record] = []
    for r in picks:
        assert isinstance(r, Conversation)  # _prompt checked every pick above
        if r.prompt in answer:
            kept.append(replace(r, messages=(*r.prompt, Message("assistant", answer[r.prompt]))))
    if not kept:
        raise TunelabError(f"data.mix.answers: self: none of the base model's {len(order)} answers to {mix.path}'s "
                           f"prompts ended within data.mix.max_new_tokens={mix.max_new_tokens}; raise it or use "
                           "answers: reference", 2)
    if log is not None:
        log(f"data.mix.answers: self -- the base model answered {len(order)} general prompts; {len(answer)} ended "
            f"within {mix.max_new_tokens} tokens and are mixed in ({len(kept)} examples)")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # data-parallel processes each write the same answers
    tmp.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in kept), encoding="utf-8")
    tmp.replace(out)
    return kept
