"""SFT-LoRA throughput: tunelab vs TRL's SFTTrainer with its defaults, same model, data, batch, length, precision.

Each framework runs in its own subprocess (so peak RSS is its own); both train SmolLM2-135M-Instruct with LoRA
(r=16, alpha=32, all linear layers), bf16, batch 8, max length 1024, lr 2e-4, on the same
synthetic chat data whose lengths follow a log-normal spread (16..900 tokens). After `--warmup` steps the next
`--steps` steps are timed. Reported: useful (non-padding) tokens per second, peak RSS, final loss, and model-FLOPs
utilisation against a bf16 matmul peak measured in the same run. LoRA dropout: tunelab's default (0) for the
tunelab rows; TRL with dropout 0.05 (the figures before issue 16), `trl-drop0` with PEFT's default 0.

    .venv/bin/python bench/sft_throughput.py --steps 8 --warmup 2
    .venv/bin/python bench/sft_throughput.py --workers tunelab,tunelab+compile,trl,trl-drop0
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BATCH, MAX_LEN, LR = 8, 1024, 2e-4
# tunelab's default (no gradient checkpointing), with it (TRL's default), with train.compile; TRL's SFTTrainer
# defaults with LoRA dropout 0.05 and 0.
# `tunelab-before`: the defaults before issue 16 (LoRA dropout 0.05, the whole logits at once).
TUNELAB: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {  # name -> (train overrides, lora overrides)
    "tunelab": ({}, {}),
    "tunelab+gc": ({"gradient_checkpointing": True}, {}),
    "tunelab+compile": ({"compile": True}, {}),
    "tunelab-before": ({"loss_chunk": 0}, {"dropout": 0.05}),
}
WORKERS = (*TUNELAB, "trl", "trl-drop0")
DEFAULT_WORKERS = "tunelab,tunelab+gc,trl"
WORDS = ("patient presents with acute chronic pain fever cough history of hypertension diabetes plan follow up "
         "return precautions medication dose daily twice assessment stable improving worse imaging labs normal "
         "the a of and to in with for on at by from").split()


def make_data(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        # ~1.3 tokens per word here; log-normal lengths like real chat data (many short, a long tail)
        total = int(min(900, max(16, rng.lognormvariate(5.3, 0.7))) / 1.3)
        u = max(3, int(total * rng.uniform(0.2, 0.6)))
        a = max(3, total - u)
        rows.append({"messages": [
            {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(u))},
            {"role": "assistant", "content": " ".join(rng.choice(WORDS) for _ in range(a))},
        ]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def matmul_peak() -> float:
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    n = 8
    for _ in range(n):
        a @ b
    return 2 * 2048**3 * n / (time.perf_counter() - t)


def non_embedding_params(model: Any) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def run_tunelab(data: Path, steps: int, warmup: int, out: Path, name: str) -> dict[str, Any]:
    from tunelab.config import config_from_dict
    from tunelab.model.loading import load_model
    from tunelab.train.run import train
    from tunelab.train.tracking import read_metrics

    cfg = config_from_dict({
        "model": {"name": "smollm2-135m-instruct", "dtype": "bf16"},
        "finetune": "lora", "lora": {"r": 16, "alpha": 32, **TUNELAB[name][1]},
        "data": {"train": str(data), "max_seq_len": MAX_LEN},
        "train": {"max_steps": warmup + steps, "batch_size": BATCH, "lr": LR, "warmup_ratio": 0.0, "log_every": 1,
                  **TUNELAB[name][0]},
        "eval": {"baseline": False}, "output_dir": str(out),
    })
    train(cfg, overwrite=True, show_progress=False)
    rows = [r for r in read_metrics(out) if "train_loss" in r]
    a, b = rows[warmup - 1], rows[-1]
    toks = b["tokens_seen"] - a["tokens_seen"]
    secs = b["elapsed_s"] - a["elapsed_s"]
    n = non_embedding_params(load_model("smollm2-135m-instruct", dtype="bf16")[0])
    return {"tokens_per_s": toks / secs, "final_loss": b["train_loss"], "tokens": toks, "seconds": secs, "params": n,
            "first_step_s": rows[0]["elapsed_s"]}


def run_trl(data: Path, steps: int, warmup: int, out: Path, dropout: float = 0.05) -> dict[str, Any]:
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from tunelab.model.loading import load_tokenizer, resolve_model

    path = resolve_model("smollm2-135m-instruct").path
    import torch

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
    tok = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    ds = load_dataset("json", data_files=str(data), split="train")
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=BATCH, gradient_accumulation_steps=1,
                     max_length=MAX_LEN, bf16=True, learning_rate=LR, max_steps=warmup + steps, logging_steps=1,
                     report_to=[], save_strategy="no", use_cpu=True, warmup_steps=0, dataloader_num_workers=0)
    peft_cfg = LoraConfig(r=16, lora_alpha=32, lora_dropout=dropout, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tok, peft_config=peft_cfg)
    counts: list[int] = []
    inner = trainer.data_collator

    def counting(features: list[Any]) -> Any:
        batch = inner(features)
        mask = batch.get("attention_mask")
        counts.append(int(mask.sum()) if mask is not None else int((batch["input_ids"] != tok.pad_token_id).sum()))
        return batch

    trainer.data_collator = counting
    times: list[float] = []
    losses: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            times.append(time.perf_counter())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            if logs and "loss" in logs:
                losses.append(float(logs["loss"]))

    trainer.add_callback(Clock())
    trainer.train()
    toks = sum(counts[warmup : warmup + steps])
    secs = times[warmup + steps - 1] - times[warmup - 1]
    return {"tokens_per_s": toks / secs, "final_loss": losses[-1], "tokens": toks, "seconds": secs,
            "gradient_checkpointing": bool(args.gradient_checkpointing)}


def worker(name: str, data: Path, steps: int, warmup: int) -> None:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "out"
        if name.startswith("trl"):
            res = run_trl(data, steps, warmup, out, 0.0 if name == "trl-drop0" else 0.05)
        else:
            res = run_tunelab(data, steps, warmup, out, name)
    res["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    res["matmul_peak_gflops"] = matmul_peak() / 1e9
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--worker", choices=WORKERS)
    ap.add_argument("--workers", default=DEFAULT_WORKERS, help=f"comma-separated, from {', '.join(WORKERS)}")
    ap.add_argument("--data")
    a = ap.parse_args()
    if a.worker:
        worker(a.worker, Path(a.data), a.steps, a.warmup)
        return
    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "data.jsonl"
        make_data(data, a.examples)
        results = {}
        names = a.workers.split(",")
        if "trl" not in names or "tunelab" not in names or not set(names) <= set(WORKERS):
            sys.exit(f"--workers: tunelab and trl are needed, others from {', '.join(WORKERS)}")
        for name in names:
            # A fresh inductor cache: step 1 of tunelab+compile is a cold compile, as a user's first run pays it.
            env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "TORCHINDUCTOR_CACHE_DIR": str(Path(d) / "inductor")}
            p = subprocess.run([sys.executable, __file__, "--worker", name, "--data", str(data), "--steps", str(a.steps),
                                "--warmup", str(a.warmup)], capture_output=True, text=True, env=env)
            line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
            if p.returncode or not line:
                sys.exit(f"{name} failed:\n{p.stderr[-3000:]}")
            results[name] = json.loads(line[0][7:])
    t, r = results["tunelab"], results["trl"]
    peak = max(t["matmul_peak_gflops"], r["matmul_peak_gflops"]) * 1e9
    # LoRA model FLOPs per token: forward 2N + backward through activations 2N (frozen weights get no grads).
    mfu = {k: 4 * t["params"] * v["tokens_per_s"] / peak for k, v in results.items()}
    print(f"\nSFT-LoRA on SmolLM2-135M, batch {BATCH}, max length {MAX_LEN}, bf16, {a.steps} timed steps")
    print(f"{'':16} {'useful tok/s':>13} {'peak RSS MiB':>13} {'final loss':>11} {'MFU':>7} {'step 1 s':>9}")
    for k, v in results.items():
        first = f"{v['first_step_s']:9.1f}" if "first_step_s" in v else f"{'':9}"
        print(f"{k:16} {v['tokens_per_s']:13.0f} {v['peak_rss_mib']:13.0f} {v['final_loss']:11.3f} {100 * mfu[k]:6.1f}% "
              f"{first}")
    for k in (k for k in results if k.startswith("tunelab")):
        v = results[k]
        print(f"{k} vs trl: {v['tokens_per_s'] / r['tokens_per_s']:.2f}x useful tokens/s, "
              f"{v['peak_rss_mib'] / r['peak_rss_mib']:.2f}x peak memory")
    print(f"bf16 matmul peak {peak / 1e9:.0f} GFLOP/s; TRL gradient_checkpointing={r.get('gradient_checkpointing')}")


if __name__ == "__main__":
    main()
