"""Per-token cost of constrained decoding (response_format json_schema through llguidance) in the serving
engine: the same batch of greedy requests with and without a schema, tokens per second and the time spent
in the grammar (mask + consume) per constrained token.

    PYTHONPATH=. OMP_NUM_THREADS=2 .venv/bin/python bench/constrained_decoding.py [--model smollm2-135m-instruct]

Requests go straight to the engine (no HTTP), all submitted at once, so a row count of 8 is one batch of 8.
The schema asks for a fixed number of strings so constrained answers run to max_tokens like free ones.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

from tunelab.engine import constrained
from tunelab.engine.types import Constraint, GenerationRequest, SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["notes"],
          "properties": {"notes": {"type": "array", "minItems": 30, "maxItems": 30,
                                   "items": {"type": "string", "maxLength": 60}}}}
PROMPT = [{"role": "user", "content": "Write a long, detailed story about a lighthouse keeper and the sea."}]


class GrammarTimer:
    """Wraps RowConstraint.mask/consume to add up the seconds spent in the grammar."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.calls = 0
        self._mask, self._consume = constrained.RowConstraint.mask, constrained.RowConstraint.consume
        timer = self

        def mask(rc: Any, logits: Any) -> Any:
            t = time.perf_counter()
            try:
                return timer._mask(rc, logits)
            finally:
                timer.seconds += time.perf_counter() - t
                timer.calls += 1

        def consume(rc: Any, token: int) -> None:
            t = time.perf_counter()
            try:
                timer._consume(rc, token)
            finally:
                timer.seconds += time.perf_counter() - t

        constrained.RowConstraint.mask = mask  # type: ignore[method-assign]
        constrained.RowConstraint.consume = consume  # type: ignore[method-assign]


async def run(engine: Any, rows: int, max_tokens: int, schema: bool) -> tuple[int, float, list[str]]:
    c = Constraint("json", schema=json.dumps(SCHEMA)) if schema else None
    sp = SamplingParams(max_tokens=max_tokens, temperature=0, constraint=c)
    start = time.perf_counter()
    streams = [await engine.submit(GenerationRequest(engine.base_model_name, sp, messages=PROMPT)) for _ in range(rows)]

    async def drain(s: Any) -> tuple[int, str]:
        text, n = [], 0
        async for ev in s:
            text.append(ev.text)
            n = ev.completion_tokens
        return n, "".join(text)

    outs = await asyncio.gather(*(drain(s) for s in streams))
    return sum(n for n, _ in outs), time.perf_counter() - start, [t for _, t in outs]


async def main_async(args: argparse.Namespace) -> None:
    from tunelab.engine.engine import Engine
    from tunelab.model.loading import load_model

    model, tok = load_model(args.model, dtype=args.dtype)
    engine = Engine(model, tok, base_name="bench", batch_wait_s=0.05)
    timer = GrammarTimer()
    try:
        await run(engine, 1, 8, True)  # warm-up: llguidance's tokenizer view is built once per tokenizer
        await run(engine, 1, 8, False)
        lines = []
        for rows in args.rows:
            free_tok, free_s, _ = await run(engine, rows, args.max_tokens, False)
            timer.seconds, timer.calls = 0.0, 0
            con_tok, con_s, texts = await run(engine, rows, args.max_tokens, True)
            per_tok_ms = 1000 * timer.seconds / max(timer.calls, 1)
            lines.append((rows, free_tok / free_s, con_tok / con_s, per_tok_ms,
                          100 * (free_tok / free_s - con_tok / con_s) / (free_tok / free_s), texts[0][:40]))
    finally:
        engine.close()
    print(f"\nconstrained decoding: {args.model} ({args.dtype}), greedy, max_tokens={args.max_tokens}, "
          f"llguidance per-row masks")
    print(f"{'rows':>5} {'tok/s free':>11} {'tok/s schema':>13} {'slower':>7} {'grammar ms/token':>17}  first output")
    for rows, free, con, ms, slower, head in lines:
        print(f"{rows:>5} {free:>11.1f} {con:>13.1f} {slower:>6.1f}% {ms:>17.3f}  {head!r}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 8])
    asyncio.run(main_async(ap.parse_args()))


if __name__ == "__main__":
    main()
