"""Golden numbers (torchtune-style): the per-step training loss of a small, seeded SFT run on the tiny model,
pinned. The end-of-turn token is part of every trained turn, so the mask rule is in these numbers too. Any change to the loop, the label masks, the end-of-turn token, packing, the schedule or the loss
that moves these numbers fails here; if the change is intended, re-pin them with the command below and say
why in the commit.

    PYTHONPATH=$PWD .venv/bin/python -m pytest -q tests/unit/test_golden_losses.py -s   # prints GOLDEN = [...]

Pinned on CPU in fp32 (torch 2.13, transformers 5.23); other hardware may differ beyond the tolerance.
"""

from __future__ import annotations

import math
from pathlib import Path

from test_training import make_cfg

from tunelab.train.run import train
from tunelab.train.tracking import read_metrics

GOLDEN: list[float] = [6.655837, 7.088129, 6.611925, 5.90117, 5.709485, 6.0198, 5.151935, 5.434301]


def test_sft_losses_are_pinned(tmp_path: Path, tiny_dir: Path) -> None:
    cfg = make_cfg(tmp_path, tiny_dir, n=24, train={"max_steps": 8, "batch_size": 4, "lr": 5e-3, "seed": 11,
                                                   "warmup_ratio": 0.25})
    res = train(cfg)
    losses = [float(r["train_loss"]) for r in read_metrics(res.run_dir) if "train_loss" in r]
    print("GOLDEN =", [round(x, 6) for x in losses])
    assert len(losses) == 8
    assert all(math.isfinite(x) for x in losses)
    assert len(GOLDEN) == 8, "no golden values pinned"
    for step, (got, want) in enumerate(zip(losses, GOLDEN, strict=True), start=1):
        assert abs(got - want) <= 1e-4 * max(1.0, abs(want)), f"step {step}: loss {got:.6f}, pinned {want:.6f}"
