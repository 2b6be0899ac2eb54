"""DPO with LoRA on SmolLM2-135M-Instruct, three ways, on the same pairs and batch size:

  tunelab-disabled  tunelab's DPO, reference = the same model with the adapter disabled (no second copy)
  tunelab-precomp   tunelab's DPO with `precompute_ref: true` (reference log-probs once, before training)
  trl-defaults      TRL's DPOTrainer with its defaults (+ the same LoRA settings, batch size, steps, lr)

Each variant runs in its own process, so the peak resident memory (ru_maxrss) is that variant's alone.
Prints a table: setup seconds (precompute for tunelab-precomp), training pairs/s (steady state: the first
step is excluded), peak RSS. On a GPU the peak CUDA allocation is printed too.

    python bench/dpo_memory_speed.py                       # 6 steps of 4 pairs
    python bench/dpo_memory_speed.py --steps 10 --batch 8
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
PAIRS = ROOT / "tunelab" / "resources" / "preference" / "pairs_train.jsonl"
VARIANTS = ("tunelab-disabled", "tunelab-precomp", "trl-defaults")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cuda_peak_mib() -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None


def run_tunelab(variant: str, n: int, steps: int, batch: int, seq: int, out: Path) -> dict[str, Any]:
    from tunelab.config import config_from_dict
    from tunelab.train import run as run_mod
    data = out / "pairs.jsonl"
    data.write_text("".join(PAIRS.read_text().splitlines(keepends=True)[:n]))
    cfg = config_from_dict({
        "model": {"name": "smollm2-135m-instruct"}, "method": "dpo",
        "dpo": {"beta": 0.1, "precompute_ref": variant == "tunelab-precomp"},
        "finetune": "lora", "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
        "data": {"train": str(data), "max_seq_len": seq},
        "train": {"max_steps": steps, "batch_size": batch, "lr": 5e-5, "warmup_ratio": 0.0, "log_every": 1},
        "eval": {"baseline": False}, "output_dir": str(out / "run"),
    })
    from tunelab.train import loop as loop_mod
    from tunelab.train.dpo import DPO

    times: dict[str, float] = {}
    step_times: list[float] = []
    real_step, real_setup = loop_mod.train_step, DPO.setup

    def timed_step(ctx: Any, mbs: Any) -> Any:
        t = time.perf_counter()
        res = real_step(ctx, mbs)
        step_times.append(time.perf_counter() - t)
        return res

    def timed_setup(self: Any, ctx: Any) -> None:
        t = time.perf_counter()
        real_setup(self, ctx)
        times["setup"] = time.perf_counter() - t

    # This process runs one variant and exits, so patching the module in place is harmless.
    loop_mod.train_step = timed_step  # type: ignore[assignment]
    DPO.setup = timed_setup  # type: ignore[method-assign]
    run_mod.train(cfg, overwrite=True, show_progress=False)
    steady = step_times[1:] or step_times
    return {"setup_s": times.get("setup", 0.0), "pairs_per_s": batch * len(steady) / sum(steady)}


def run_trl(n: int, steps: int, batch: int, seq: int, out: Path) -> dict[str, Any]:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from tunelab.model.loading import load_model

    model, tok = load_model("smollm2-135m-instruct")
    rows = [json.loads(x) for x in PAIRS.read_text().splitlines()[:n]]
    ds = Dataset.from_list([
        {"prompt": [{"role": "user", "content": r["prompt"]}], "chosen": [{"role": "assistant", "content": r["chosen"]}],
         "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.t = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            step_times.append(time.perf_counter() - self.t)

    args = DPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=batch, max_steps=steps,
                     learning_rate=5e-5, beta=0.1, report_to="none", save_strategy="no", logging_steps=1000,
                     max_length=seq, use_cpu=not __import__("torch").cuda.is_available(), bf16=False)
    t = time.perf_counter()
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok,
                         peft_config=LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear",
                                                task_type="CAUSAL_LM"),
                         callbacks=[Timer()])
    setup = time.perf_counter() - t
    trainer.train()
    steady = step_times[1:] or step_times
    return {"setup_s": setup, "pairs_per_s": batch * len(steady) / sum(steady)}


def child(variant: str, a: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as d:
        if variant == "trl-defaults":
            res = run_trl(a.pairs, a.steps, a.batch, a.seq, Path(d))
        else:
            res = run_tunelab(variant, a.pairs, a.steps, a.batch, a.seq, Path(d))
    res.update(variant=variant, peak_rss_mib=peak_rss_mib(), cuda_peak_mib=cuda_peak_mib())
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=48)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a)
        return
    rows = []
    for v in a.variants.split(","):
        cmd = [sys.executable, __file__, "--child", v, "--steps", str(a.steps), "--batch", str(a.batch),
               "--pairs", str(a.pairs), "--seq", str(a.seq)]
        p = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
        if line is None:
            print(f"{v}: failed\n{p.stderr[-3000:]}", file=sys.stderr)
            continue
        rows.append(json.loads(line[7:]))
    print(f"DPO + LoRA r16 on SmolLM2-135M-Instruct: {a.steps} steps x {a.batch} pairs, max_seq_len {a.seq}")
    print(f"{'variant':<18} {'setup s':>8} {'pairs/s':>8} {'peak RSS MiB':>13} {'CUDA peak MiB':>14}")
    for r in rows:
        cuda = f"{r['cuda_peak_mib']:.0f}" if r["cuda_peak_mib"] is not None else "-"
        print(f"{r['variant']:<18} {r['setup_s']:>8.1f} {r['pairs_per_s']:>8.2f} {r['peak_rss_mib']:>13.0f} {cuda:>14}")


if __name__ == "__main__":
    main()
