"""Load test: N concurrent clients over K adapters against a live `tunelab serve` on SmolLM2-135M.

Creates K random LoRA adapters in a temp dir, starts the server on them, sends a fixed number of chat
requests from `--concurrency` clients (each picks the next request; request i goes to adapter i mod K),
and prints failed requests, requests/s, p50/p95 latency and generated tokens/s.

    .venv/bin/python bench/serve_load.py --requests 96 --concurrency 32 --adapters 8 --max-tokens 24
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import httpx
from serve_common import ServeProcess, make_adapters, percentile, table

ADMIN_KEY = "sk-bench-admin"


async def load(url: str, names: list[str], requests: int, concurrency: int, max_tokens: int) -> dict[str, float]:
    latencies: list[float] = []
    tokens = 0
    failures: list[str] = []
    next_i = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_i, tokens
        while next_i < requests:
            i = next_i
            next_i += 1
            body = {"model": names[i % len(names)], "max_tokens": max_tokens, "temperature": 0.7, "seed": i,
                    "messages": [{"role": "user", "content": f"Write a short note about topic number {i}."}]}
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/chat/completions", json=body)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                tokens += r.json()["usage"]["completion_tokens"]
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as e:
                failures.append(repr(e))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    # An admin key: /health's engine counters are for admin keys only.
    auth = {"Authorization": f"Bearer {ADMIN_KEY}"}
    async with httpx.AsyncClient(timeout=1800, limits=limits, headers=auth) as http:
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
        health = (await http.get(f"{url.removesuffix('/v1')}/health")).json()["engine"]
    for f in failures[:5]:
        print("failure:", f)
    return {"requests": requests, "failed": len(failures), "wall_s": wall, "req_per_s": len(latencies) / wall,
            "p50_s": percentile(latencies, 0.5), "p95_s": percentile(latencies, 0.95), "tokens_per_s": tokens / wall,
            "joined_mid_batch": health["joined"], "peak_rows": health["peak_running"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=24)
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(args.model, Path(tmp), args.adapters, dtype=args.dtype)
        server = ServeProcess(["--model", args.model, "--adapters-dir", tmp, "--dtype", args.dtype,
                               "--max-loaded-adapters", str(args.adapters), "--admin-key", ADMIN_KEY])
        try:
            result = asyncio.run(load(server.url, names, args.requests, args.concurrency, args.max_tokens))
        finally:
            server.stop()
    print(f"\nload: {args.concurrency} clients, {args.adapters} adapters, {args.requests} requests, "
          f"max_tokens={args.max_tokens}, {args.model} ({args.dtype})")
    print(table([result]))


if __name__ == "__main__":
    main()
