"""Plain generation for the CLI (`tunelab generate`, `tunelab chat`): one model, one conversation at a time.
The serving engine (tunelab.engine) is the batched, multi-adapter path; this is the simple one."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from tunelab.data.records import Message
from tunelab.data.templates import encode_prompt


@dataclass
class Generator:
    model: Any
    tokenizer: Any
    description: str

    @classmethod
    def load(cls, target: str, merge: bool = False) -> Generator:
        from tunelab.model.adapters import load_for_inference

        model, tok, desc = load_for_inference(target, merge=merge)
        return cls(model, tok, desc)

    @torch.no_grad()
    def chat(self, messages: list[dict[str, str]], system: str | None = None, max_new_tokens: int = 256,
             temperature: float = 0.0, seed: int | None = None) -> str:
        msgs = [Message(m["role"], m["content"]) for m in messages]
        ids = encode_prompt(self.tokenizer, msgs, system_prompt=system)
        if seed is not None:
            torch.manual_seed(seed)
        x = torch.tensor([ids], device=self.model.device)
        kw: dict[str, Any] = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens,
                              "pad_token_id": self.tokenizer.pad_token_id, "eos_token_id": self.tokenizer.eos_token_id}
        if temperature > 0:
            kw.update(temperature=temperature, top_p=0.95)
        out = self.model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kw)
        return str(self.tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)).strip()
