"""Shared pieces of the serving benchmarks: random LoRA adapters for a base model, a `tunelab serve`
subprocess, percentiles and table printing."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any


def make_adapters(model: str, out: Path, count: int = 8, r: int = 8, dtype: str = "fp32") -> list[str]:
    """Write `count` random LoRA adapters (attention q/k/v/o) for `model` into out/ad0 ... out/adN-1."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.model.loading import load_model

    base, _ = load_model(model, dtype=dtype)
    names = []
    for i in range(count):
        torch.manual_seed(1000 + i)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
                         init_lora_weights=False, task_type="CAUSAL_LM")
        pm = get_peft_model(base, cfg)
        with torch.no_grad():
            for n, p in pm.named_parameters():
                if "lora_" in n:
                    p.normal_(0, 0.05)
        pm.save_pretrained(out / f"ad{i}")
        names.append(f"ad{i}")
        base = pm.unload()  # back to the plain base for the next adapter
    return names


class ServeProcess:
    """`tunelab serve ... --port 0` in a subprocess; `.url` is its /v1 base URL."""

    def __init__(self, args: list[str], timeout: float = 600) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        cmd = [sys.executable, "-c", "from tunelab.cli import main; main()", "serve", "--port", "0", "--no-jobs", *args]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        self.lines: list[str] = []
        ready = threading.Event()

        def read() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line.rstrip("\n"))
                if line.startswith("try:"):
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(timeout)
        found = [m.group(1) for m in (re.match(r"serving on (\S+)", ln) for ln in self.lines) if m]
        if not found:
            self.proc.kill()
            raise SystemExit("server did not start:\n" + "\n".join(self.lines))
        self.url = found[0]

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=120)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    cells = [[_fmt(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)) + " |",
             "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
    lines += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) + " |" for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.2f}"
    return str(v)
