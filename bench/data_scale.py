"""Data toolkit at scale: dedup and scrub of N generated chat examples (default 1,000,000).

Generates a messages-JSONL file with planted exact duplicates (2%), near-duplicates (2%, one word changed)
and PII (5% of rows), then runs `dedup` and `scrub` each in its own process and prints a table: wall time,
rows/s, peak memory of the whole process tree (main + `datasets` workers, sampled with psutil) and what was
found. Targets for dedup of 1M rows: under 15 minutes, under 4 GiB peak.

    python bench/data_scale.py                 # 1,000,000 rows
    python bench/data_scale.py --rows 100000 --num-proc 2
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

WORDS = (
    "account billing invoice refund password login email shipping order parcel warehouse courier subscription "
    "plan upgrade downgrade cancel renew discount coupon receipt payment card bank transfer delivery address "
    "tracking number return policy warranty device battery screen charger cable setting profile security "
    "update version error message support ticket agent manager customer help question answer please thanks "
    "today tomorrow week month year morning evening quickly slowly again never always maybe certainly"
).split()
PII = ["reach me at {n}.user@example.com", "call (415) 555-{d:04d}", "card 4111 1111 1111 1111",
       "from IP 10.0.{a}.{b}", "ssn 123-45-{d:04d}"]


def generate(path: Path, rows: int, seed: int = 0) -> dict[str, int]:
    rng = random.Random(seed)
    planted = {"exact": 0, "near": 0, "pii": 0}
    recent: list[tuple[str, str]] = []
    with path.open("w", encoding="utf-8") as f:
        for i in range(rows):
            r = rng.random()
            if r < 0.02 and recent:
                q, a = rng.choice(recent)
                planted["exact"] += 1
            elif r < 0.04 and recent:
                q, a = rng.choice(recent)
                w = a.split()
                w[-1] = rng.choice(WORDS) + "x"
                a = " ".join(w)
                planted["near"] += 1
            else:
                q = f"Question {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))) + "?"
                a = " ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80))) + "."
                if rng.random() < 0.05:
                    q += " " + rng.choice(PII).format(n=i, d=i % 10000, a=i % 250, b=i % 199 + 1)
                    planted["pii"] += 1
                recent.append((q, a))
                if len(recent) > 1000:
                    recent.pop(rng.randrange(len(recent)))
            row = {"messages": [{"role": "system", "content": "You are a helpful support agent."},
                                {"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            f.write(json.dumps(row) + "\n")
    return planted


def _tree_rss(pid: int) -> int:
    import psutil

    try:
        p = psutil.Process(pid)
        procs = [p, *p.children(recursive=True)]
    except psutil.Error:
        return 0
    total = 0
    for q in procs:
        try:
            total += q.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_step(step: str, src: Path, work: Path, num_proc: int | None) -> dict[str, Any]:
    """Runs one step in a fresh process so its peak memory is its own; samples the whole tree's RSS."""
    args = [sys.executable, __file__, "--child", step, "--src", str(src), "--work", str(work)]
    if num_proc:
        args += ["--num-proc", str(num_proc)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, _tree_rss(proc.pid))
            stop.wait(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out, _ = proc.communicate()
    stop.set()
    th.join()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{step} failed with exit code {proc.returncode}")
    rep = json.loads(out.strip().splitlines()[-1])
    return {"step": step, "wall_s": wall, "rows": rep["rows_in"], "rows_per_s": rep["rows_in"] / wall,
            "peak_gib": peak / 2**30, "report": rep}


def child(step: str, src: Path, work: Path, num_proc: int | None) -> None:
    from tunelab.data.toolkit.dedup import DedupConfig, dedup
    from tunelab.data.toolkit.scrub import ScrubConfig, scrub

    if step == "dedup":
        rep = dedup(src, work / "dedup.jsonl", DedupConfig(num_proc=num_proc))
    else:
        rep = scrub(src, work / "scrub.jsonl", ScrubConfig(num_proc=num_proc))
    print(json.dumps(rep.to_json()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--num-proc", type=int, default=None, help="datasets worker processes [auto]")
    ap.add_argument("--steps", default="dedup,scrub")
    ap.add_argument("--work", default=None, help="folder for the generated file and outputs [temp]")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--src", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, Path(a.src), Path(a.work), a.num_proc)
        return
    work = Path(a.work or tempfile.mkdtemp(prefix="tunelab-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    src = work / "chats.jsonl"
    t0 = time.perf_counter()
    planted = generate(src, a.rows)
    gen_s = time.perf_counter() - t0
    print(f"generated {a.rows:,} rows ({src.stat().st_size / 2**20:.0f} MiB) in {gen_s:.0f}s; planted {planted}; "
          f"cpus={os.cpu_count()} load={os.getloadavg()[0]:.1f}", flush=True)
    results = [run_step(s, src, work, a.num_proc) for s in a.steps.split(",")]
    print()
    print("| step  | rows      | wall (s) | rows/s  | peak RSS (GiB) | found |")
    print("|-------|-----------|----------|---------|----------------|-------|")
    for r in results:
        rep = r["report"]
        found = rep["reasons"] if r["step"] == "dedup" else rep["details"]["pii_counts"]
        print(f"| {r['step']:<5} | {r['rows']:>9,} | {r['wall_s']:>8.1f} | {r['rows_per_s']:>7,.0f} | "
              f"{r['peak_gib']:>14.2f} | {json.dumps(found)} |")
    print(f"\nplanted: {json.dumps(planted)}; load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
