"""How close `tunelab plan memory` comes to the measured peak: SmolLM2-135M, lora / qlora / full, 4 shapes each.

Each case runs in a fresh process (`tunelab plan memory MODEL ... --measure --json`: 3 real steps, see
tunelab/plan/measure.py for how the peak is taken) and the table prints estimate vs measured and the error.
Target: within 15%.

    OMP_NUM_THREADS=2 PYTHONPATH=$PWD .venv/bin/python bench/plan_accuracy.py [--device cpu|cuda] [--quick]
        [--method full --shape 512x1 ...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = [(128, 1), (256, 2), (512, 1), (512, 2)]
METHODS = ["lora", "qlora", "full"]


def run_case(model: str, method: str, seq: int, batch: int, device: str) -> dict:
    cmd = [sys.executable, "-m", "tunelab.cli", "plan", "memory", model, "--method", method, "--seq-len", str(seq),
           "--batch", str(batch), "--device", device, "--measure", "--json"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    return json.loads(p.stdout[p.stdout.index("{"):])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="one shape per method")
    ap.add_argument("--method", action="append", choices=METHODS, help="only this method (repeatable)")
    ap.add_argument("--shape", action="append", help="only this SEQxBATCH shape, e.g. 512x2 (repeatable)")
    args = ap.parse_args()
    shapes = SHAPES[:1] if args.quick else SHAPES
    if args.shape:
        shapes = [(int(s.split("x")[0]), int(s.split("x")[1])) for s in args.shape]
    methods = args.method or METHODS
    rows = []
    print(f"{'method':7} {'seq':>5} {'batch':>5} {'estimate MB':>12} {'measured MB':>12} {'error':>7} {'peak at':>15} "
          f"{'s/step':>7}", flush=True)
    for method in methods:
        for seq, batch in shapes:
            d = run_case(args.model, method, seq, batch, args.device)
            est = d["allocated_bytes"]
            meas = d["measured_bytes"]
            err = 100 * (est - meas) / meas
            rows.append(err)
            print(f"{method:7} {seq:5} {batch:5} {est / 1e6:12.0f} {meas / 1e6:12.0f} {err:+6.1f}% {d['peak_at']:>15} "
                  f"{d['measure']['seconds_per_step']:7.1f}", flush=True)
    worst = max(abs(e) for e in rows)
    print(f"worst |error| {worst:.1f}% over {len(rows)} cases (target 15%)")


if __name__ == "__main__":
    main()
