"""bench/gpu_check.sh is run only when a GPU is lent; this keeps it runnable in the meantime (dry run on CPU)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_gpu_check_script_parses() -> None:
    for script in ("bench/gpu_check.sh", "bench/gpu_wheels.sh"):
        subprocess.run(["bash", "-n", script], cwd=ROOT, check=True)


def test_gpu_check_dry_run_trains_and_prints_the_table() -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "bench/gpu_check.py", "--dry-run", "--methods", "lora"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    row = [line for line in p.stdout.splitlines() if line.startswith("tiny lora")]
    assert row, p.stdout
    fields = row[0].split()
    assert float(fields[2]) > 0  # tokens/s were measured
    assert "bf16 matmul peak" in p.stdout
