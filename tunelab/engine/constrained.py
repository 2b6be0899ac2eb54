"""Constrained decoding with llguidance: a request's `Constraint` (a JSON Schema, any JSON object, or a tool
call in the chat template's own format) becomes a grammar, and each constrained row of a batch gets a token
mask before its next token is picked. Rows without a constraint are untouched, so constrained and free
requests, base and adapter rows, share one batch.

The grammar is compiled when the request is submitted (a schema llguidance cannot use is a 400 then, not a
failed row later); the mask is computed per row per token on the CPU (llguidance's Rust matcher) and applied
to that row's logits only. When the grammar is complete only the stop tokens stay allowed, so a constrained
answer ends where its JSON ends.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import llguidance
import llguidance.hf
import torch

from tunelab.data.templates import ToolFormat
from tunelab.engine.types import Constraint

_tok_cache: weakref.WeakKeyDictionary[Any, dict[tuple[int, tuple[int, ...]], llguidance.LLTokenizer]] = (
    weakref.WeakKeyDictionary())
# Compact JSON: a model's whitespace habits vary, and free whitespace lets a weak model wander for ever.
_COMPACT = {"whitespace_flexible": False}
_SHIFTS = torch.arange(32, dtype=torch.int32)


class GrammarError(ValueError):
    """The constraint cannot be compiled (llguidance's message says why)."""


def ll_tokenizer(tok: Any, n_vocab: int, stop_ids: frozenset[int] | set[int]) -> llguidance.LLTokenizer:
    """llguidance's view of `tok` (built once per tokenizer, vocabulary width and stop tokens: it is slow)."""
    key = (n_vocab, tuple(sorted(stop_ids)))
    per_tok = _tok_cache.setdefault(tok, {})
    if key not in per_tok:
        per_tok[key] = llguidance.hf.from_tokenizer(tok, n_vocab=n_vocab, eos_token=list(key[1]) or None)
    return per_tok[key]


def _schema(raw: dict[str, Any]) -> dict[str, Any]:
    return {**raw, "x-guidance": {**_COMPACT, **raw.get("x-guidance", {})}}


def grammar_for(c: Constraint, fmt: ToolFormat | None) -> str:
    """The llguidance grammar (its JSON text) for one constraint."""
    if c.kind == "json":
        schema = json.loads(c.schema) if c.schema is not None else {"type": "object"}
        return str(llguidance.grammar_from("json_schema", json.dumps(_schema(schema))))
    if fmt is None:
        raise GrammarError("a tool call needs the chat template's tool format")
    alts = []
    for name, params in c.functions:
        call = {"type": "object", "properties": {"name": {"const": name}, fmt.args_key: json.loads(params)},
                "required": ["name", fmt.args_key], "additionalProperties": False}
        alts.append(f"%json{json.dumps(_schema(call))}")
    body = " | ".join(alts)
    if fmt.kind == "hermes":
        lark = f'start: "<tool_call>\\n" call "\\n</tool_call>"\ncall: {body}\n'
    else:
        lark = f"start: {body}\n"
    return str(llguidance.grammar_from("lark", lark))


class RowConstraint:
    """One row's grammar state: `mask` its logits before picking, `consume` the token picked."""

    def __init__(self, lltok: llguidance.LLTokenizer, grammar: str, n_vocab: int) -> None:
        self.matcher = llguidance.LLMatcher(lltok, grammar)
        if self.matcher.is_error():
            raise GrammarError(self.matcher.get_error())
        self.n_vocab = n_vocab
        self.bitmask = torch.full(((n_vocab + 31) // 32,), -1, dtype=torch.int32)  # bit k of word w: token 32w+k

    def mask(self, logits: torch.Tensor) -> torch.Tensor:
        """A copy of one row's (vocab,) logits with every token the grammar forbids at -inf."""
        self.matcher.unsafe_compute_mask_ptr(self.bitmask.data_ptr(), self.bitmask.numel() * 4)
        # Unpacked with plain tensor ops: llguidance.torch's helper is a torch.compile kernel, whose compile (and
        # recompiles across threads and inference mode) cost seconds per call on a CPU server.
        bits = (self.bitmask[:, None] >> _SHIFTS) & 1
        allowed = bits.reshape(-1)[: logits.shape[-1]].bool().to(logits.device)
        if allowed.shape[0] < logits.shape[-1]:  # logits wider than the grammar's vocabulary: the rest is banned
            allowed = torch.nn.functional.pad(allowed, (0, logits.shape[-1] - allowed.shape[0]))
        return logits.detach().float().masked_fill(~allowed, float("-inf"))

    def consume(self, token: int) -> None:
        if not self.matcher.consume_token(token):
            raise GrammarError(f"token {token} broke the grammar: {self.matcher.get_error()}")


def build(tok: Any, n_vocab: int, stop_ids: frozenset[int] | set[int], c: Constraint,
          fmt: ToolFormat | None) -> RowConstraint:
    """A fresh row constraint; GrammarError when the schema or grammar cannot be compiled."""
    try:
        grammar = grammar_for(c, fmt)
    except (ValueError, TypeError) as e:
        raise GrammarError(str(e)) from e
    return RowConstraint(ll_tokenizer(tok, n_vocab, stop_ids), grammar, n_vocab)
