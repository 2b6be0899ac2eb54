"""Mixed-adapter batching vs one adapter at a time, on the same request stream, engine only (no HTTP).

The stream: `--requests` greedy text completions (short story openings) spread round-robin over
`--adapters` random LoRA adapters on SmolLM2-135M, all arriving at once. "mixed" serves them in batches of up to `--max-batch` rows whatever
their adapter (PEFT's per-row adapter_names); "one-at-a-time" batches only requests for the same adapter.
Prints generated tokens/s for both, the speedup, and checks both produce the same tokens.

    .venv/bin/python bench/serve_batching.py --requests 64 --adapters 8 --max-tokens 64 --max-batch 64
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

from serve_common import make_adapters, table

from tunelab.engine.engine import Engine
from tunelab.engine.types import GenerationRequest, SamplingParams
from tunelab.model.loading import load_model


async def burst(engine: Engine, names: list[str], requests: int, max_tokens: int) -> list[list[int]]:
    async def one(i: int) -> list[int]:
        prompt = f"Story {i}. Once upon a time, in a small village by the sea,"
        s = await engine.submit(GenerationRequest(names[i % len(names)], SamplingParams(max_tokens, 0.0),
                                                  prompt=prompt))
        async for _ in s:
            pass
        return s.token_ids

    return await asyncio.gather(*(one(i) for i in range(requests)))


def run(mode: str, args: argparse.Namespace, adapters_dir: str, names: list[str]) -> tuple[dict, list[list[int]]]:
    model, tok = load_model(args.model, dtype=args.dtype)
    engine = Engine(model, tok, base_name=args.model, adapters_dir=adapters_dir, max_batch_size=args.max_batch,
                    max_loaded_adapters=len(names), mixed_batching=(mode == "mixed"),
                    batch_wait_s=args.batch_wait)
    try:
        asyncio.run(burst(engine, names, len(names), 2))  # load every adapter first: measure batching only
        before = dict(engine.stats)
        start = time.perf_counter()
        outs = asyncio.run(burst(engine, names, args.requests, args.max_tokens))
        wall = time.perf_counter() - start
        tokens = sum(len(o) for o in outs)
        batches = engine.stats["batches"] - before["batches"]
    finally:
        engine.close()
    return {"mode": mode, "requests": args.requests, "batches": batches, "wall_s": wall,
            "tokens": tokens, "tokens_per_s": tokens / wall}, outs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--batch-wait", type=float, default=0.25,
                    help="seconds the worker waits for a burst to arrive before starting a batch")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(args.model, Path(tmp), args.adapters, dtype=args.dtype)
        single, single_out = run("one-at-a-time", args, tmp, names)
        mixed, mixed_out = run("mixed", args, tmp, names)
    print(f"\nbatching: {args.requests} requests over {args.adapters} adapters, max_tokens={args.max_tokens}, "
          f"max batch {args.max_batch}, {args.model} ({args.dtype})")
    print(table([single, mixed]))
    print(f"speedup (tokens/s, mixed / one-at-a-time): {mixed['tokens_per_s'] / single['tokens_per_s']:.2f}x")
    print(f"same greedy tokens in both modes: {'yes' if mixed_out == single_out else 'NO'}")


if __name__ == "__main__":
    main()
