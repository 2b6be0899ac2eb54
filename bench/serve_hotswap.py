"""Adapter hot-swap cost: time to first token for a cold adapter (not in memory: loaded from disk on
first use) vs a warm one (already loaded), and for the base, on SmolLM2-135M; engine only (no HTTP).

`--max-loaded` is kept below the number of adapters, so cycling through them evicts each one before it
comes back: every first request of a cycle is cold, the immediate repeat is warm.

    .venv/bin/python bench/serve_hotswap.py --adapters 8 --rounds 2
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from serve_common import make_adapters, table

from tunelab.engine.engine import Engine
from tunelab.engine.types import GenerationRequest, SamplingParams
from tunelab.model.loading import load_model


async def ttft(engine: Engine, model: str) -> float:
    start = time.perf_counter()
    s = await engine.submit(GenerationRequest(model, SamplingParams(4, 0.0),
                                              messages=[{"role": "user", "content": "Say hello."}]))
    first = None
    async for _ in s:
        if first is None:
            first = time.perf_counter() - start
    assert first is not None
    return first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--max-loaded", type=int, default=2)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    cold: list[float] = []
    warm: list[float] = []
    base: list[float] = []
    loads: list[float] = []
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(args.model, Path(tmp), args.adapters, dtype=args.dtype)
        model, tok = load_model(args.model, dtype=args.dtype)
        engine = Engine(model, tok, base_name=args.model, adapters_dir=tmp, max_loaded_adapters=args.max_loaded)
        try:
            asyncio.run(ttft(engine, args.model))  # warm up the base path once
            for _ in range(args.rounds):
                for name in names:
                    cold.append(asyncio.run(ttft(engine, name)))
                    loads.append(engine.load_seconds[name])
                    warm.append(asyncio.run(ttft(engine, name)))
                    base.append(asyncio.run(ttft(engine, args.model)))
            evictions = engine.stats["adapter_evictions"]
        finally:
            engine.close()
    rows = [
        {"case": "cold adapter (load + first token)", "n": len(cold), "median_ms": 1000 * statistics.median(cold),
         "max_ms": 1000 * max(cold)},
        {"case": "  of which adapter load", "n": len(loads), "median_ms": 1000 * statistics.median(loads),
         "max_ms": 1000 * max(loads)},
        {"case": "warm adapter", "n": len(warm), "median_ms": 1000 * statistics.median(warm),
         "max_ms": 1000 * max(warm)},
        {"case": "base model", "n": len(base), "median_ms": 1000 * statistics.median(base),
         "max_ms": 1000 * max(base)},
    ]
    print(f"\nhot-swap: {args.adapters} adapters (r=8, q/k/v/o), max_loaded={args.max_loaded}, "
          f"{args.rounds} rounds, {evictions} evictions, {args.model} ({args.dtype})")
    print(table(rows))
    print(f"cold/warm median TTFT: {statistics.median(cold) / statistics.median(warm):.2f}x")


if __name__ == "__main__":
    main()
