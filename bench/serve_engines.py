"""Our engine vs vLLM behind the same `tunelab serve`: the same K random LoRA adapters on SmolLM2-135M, N
concurrent clients, greedy chat requests of `--max-tokens` tokens (request i goes to adapter i mod K).

Starts `tunelab serve --engine tunelab`, loads it, stops it, then the same with `--engine vllm` (never both
at once), and prints one table: failed requests, requests/s, generated tokens/s, p50/p95 latency, and how many
replies were identical between the two engines (greedy, so they should nearly all be).

    .venv/bin/python bench/serve_engines.py --requests 96 --concurrency 32 --adapters 8 --max-tokens 64
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
from serve_common import ServeProcess, make_adapters, percentile, table


async def load(url: str, names: list[str], requests: int, concurrency: int,
               max_tokens: int) -> tuple[dict[str, Any], list[str | None]]:
    latencies: list[float] = []
    texts: list[str | None] = [None] * requests
    tokens = 0
    failures: list[str] = []
    next_i = 0

    async def client(http: httpx.AsyncClient) -> None:
        nonlocal next_i, tokens
        while next_i < requests:
            i = next_i
            next_i += 1
            # ignore_eos-free and greedy: each reply runs to its own end-of-turn or max_tokens.
            body = {"model": names[i % len(names)], "max_tokens": max_tokens, "temperature": 0,
                    "messages": [{"role": "user", "content": f"Write a short note about topic number {i}."}]}
            start = time.perf_counter()
            try:
                r = await http.post(f"{url}/chat/completions", json=body)
                if r.status_code != 200:
                    failures.append(f"{r.status_code}: {r.text[:200]}")
                    continue
                out = r.json()
                tokens += out["usage"]["completion_tokens"]
                texts[i] = out["choices"][0]["message"]["content"]
                latencies.append(time.perf_counter() - start)
            except httpx.HTTPError as e:
                failures.append(repr(e))

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=1800, limits=limits) as http:
        # One warm-up request per adapter outside the clock: both engines load adapters on first use.
        for name in names:
            await http.post(f"{url}/chat/completions", json={"model": name, "max_tokens": 2, "temperature": 0,
                                                              "messages": [{"role": "user", "content": "hi"}]})
        start = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(concurrency)))
        wall = time.perf_counter() - start
    for f in failures[:5]:
        print("failure:", f)
    return {"requests": requests, "failed": len(failures), "wall_s": wall, "req_per_s": len(latencies) / wall,
            "tokens": tokens, "tokens_per_s": tokens / wall, "p50_s": percentile(latencies, 0.5),
            "p95_s": percentile(latencies, 0.95)}, texts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--requests", type=int, default=96)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--engines", default="tunelab,vllm", help="comma-separated, run in this order")
    ap.add_argument("--vllm-python", default=None, help="python with vLLM (default: .venv-vllm)")
    args = ap.parse_args()
    rows: list[dict[str, Any]] = []
    replies: dict[str, list[str | None]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        names = make_adapters(args.model, Path(tmp), args.adapters, dtype=args.dtype)
        for engine in args.engines.split(","):
            extra = ["--vllm-python", args.vllm_python] if engine == "vllm" and args.vllm_python else []
            start = time.perf_counter()
            server = ServeProcess(["--engine", engine, "--model", args.model, "--adapters-dir", tmp,
                                   "--dtype", args.dtype, "--max-loaded-adapters", str(args.adapters),
                                   "--max-batch-size", str(args.concurrency), *extra], timeout=1800)
            startup = time.perf_counter() - start
            try:
                result, replies[engine] = asyncio.run(
                    load(server.url, names, args.requests, args.concurrency, args.max_tokens))
            finally:
                server.stop()
            rows.append({"engine": engine, "startup_s": startup, **result})
    if len(replies) == 2:
        a, b = replies.values()
        same = sum(1 for x, y in zip(a, b, strict=True) if x is not None and x == y)
        for row in rows:
            row["same_text"] = f"{same}/{args.requests}"
    print(f"\nengines: {args.concurrency} clients, {args.adapters} adapters, {args.requests} requests, "
          f"max_tokens={args.max_tokens}, greedy, {args.model} ({args.dtype})")
    print(table(rows))


if __name__ == "__main__":
    main()
