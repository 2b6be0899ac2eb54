"""Time (and optionally profile) tunelab's SFT step alone: the same model, data, batch and LoRA settings as
bench/sft_throughput.py's tunelab worker, without run folders, validation or TRL. For iterating on speed levers;
the figures that count come from bench/sft_throughput.py.

    OMP_NUM_THREADS=2 .venv/bin/python bench/sft_step_profile.py --steps 3 --warmup 1
    OMP_NUM_THREADS=2 .venv/bin/python bench/sft_step_profile.py --steps 2 --profile   # top self-time ops
    ... --set lora.dropout=0.05 --set train.loss_chunk=0                              # config overrides

Prints per-step seconds, useful tokens/s, peak RSS and the losses.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from sft_throughput import BATCH, LR, MAX_LEN, make_data  # noqa: E402


def nested(sets: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for s in sets:
        key, val = s.split("=", 1)
        *path, last = key.split(".")
        d = out
        for p in path:
            d = d.setdefault(p, {})
        d[last] = yaml.safe_load(val)
    return out


def merge(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for k, v in b.items():
        out[k] = merge(out.get(k, {}), v) if isinstance(v, dict) else v
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--examples", type=int, default=96)
    ap.add_argument("--profile", action="store_true", help="torch.profiler over the timed steps")
    ap.add_argument("--rows", type=int, default=25)
    ap.add_argument("--set", action="append", default=[], help="config override, e.g. lora.dropout=0.05")
    a = ap.parse_args()

    from accelerate import Accelerator

    from tunelab.config import config_from_dict
    from tunelab.model.adapters import apply_finetune
    from tunelab.model.loading import load_model
    from tunelab.train.loop import LoopContext, epoch_order, train_step
    from tunelab.train.run import build_optimizer, load_data, method_class

    torch.manual_seed(0)
    tmp = Path(tempfile.mkdtemp())
    data = tmp / "data.jsonl"
    make_data(data, a.examples)
    base = {
        "model": {"name": "smollm2-135m-instruct", "dtype": "bf16"},
        "finetune": "lora", "lora": {"r": 16, "alpha": 32},
        "data": {"train": str(data), "max_seq_len": MAX_LEN, "check_contamination": False},
        "train": {"max_steps": a.warmup + a.steps, "batch_size": BATCH, "lr": LR, "warmup_ratio": 0.0},
        "eval": {"baseline": False}, "output_dir": str(tmp / "out"),
    }
    cfg = config_from_dict(merge(base, nested(a.set)))
    model, tok = load_model(cfg.model.name, dtype=cfg.model.dtype)
    method = method_class(cfg.method)(cfg, tok)
    recs, _ = load_data(cfg, method.expect, tok, None, method.pre_encoded)
    items = [i for i in (method.encode(r) for r in recs) if i is not None]
    model = apply_finetune(model, cfg.finetune, cfg.lora, gradient_checkpointing=cfg.train.gradient_checkpointing)
    try:  # absent before issue 16: the script also profiles older trees (PYTHONPATH=/path/to/old/tree)
        from tunelab.train.fastpath import prepare_for_speed

        model = prepare_for_speed(model, cfg)
    except ImportError:
        pass
    acc = Accelerator(cpu=True)
    opt = build_optimizer(cfg, model, None)
    sch = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    model, opt = acc.prepare(model, opt)
    ctx = LoopContext(cfg=cfg, run_dir=tmp, model=model, tokenizer=tok, accelerator=acc, method=method,
                      train_items=items, valid_items=[], total_steps=a.warmup + a.steps, steps_per_epoch=1,
                      optimizer=opt, scheduler=sch, bf16=cfg.model.dtype in ("auto", "bf16"))
    order = epoch_order(len(items), cfg.train.seed, 0, 1, BATCH)
    model.train()
    prof: Any = None
    times, toks, losses = [], [], []
    for step in range(a.warmup + a.steps):
        if step == a.warmup and a.profile:
            prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=False)
            prof.__enter__()
        mb = [items[i] for i in order[step * BATCH : (step + 1) * BATCH]]
        before = ctx.state.tokens_seen
        t = time.perf_counter()
        sums = train_step(ctx, [mb])
        dt = time.perf_counter() - t
        losses.append(sums["loss_sum"] / sums["items"])
        if step >= a.warmup:
            times.append(dt)
            toks.append(ctx.state.tokens_seen - before)
        print(f"step {step + 1}: {dt:.2f} s, {ctx.state.tokens_seen - before} tokens, loss {losses[-1]:.4f}", flush=True)
    if prof is not None:
        prof.__exit__(None, None, None)
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=a.rows))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"RESULT tok/s {sum(toks) / sum(times):.1f}  s/step {sum(times) / len(times):.2f}  peak RSS {rss:.0f} MiB  "
          f"losses {[round(x, 4) for x in losses]}")


if __name__ == "__main__":
    main()
