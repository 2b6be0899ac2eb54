"""GPU check: LoRA and QLoRA SFT through tunelab's own loop on realistic shapes, one table.

For when a device is lent (see bench/gpu_check.sh, which installs carried wheels and calls this). Models are built
from a config with random weights, so nothing is downloaded: `smollm2-135m` has SmolLM2-135M's shapes, `llama-1b`
Llama-3.2-1B's (hidden 2048, 16 layers, GQA 32/8, vocab 128k). The tokenizer is the byte-level one of the tests,
so one character is one token and sequence lengths are exact. Each case runs in its own process (its peak memory is
its own): `--warmup` steps, then `--steps` timed steps of batch 8 packed rows (log-normal lengths, 16..1024).

Reported per case: useful tokens/s, MFU against a bf16 matmul peak measured on the same device, peak memory
(CUDA max_memory_allocated, or RSS on CPU), `tunelab plan memory`'s estimate where that command exists, the
attention implementation transformers chose, and whether liger-kernel's Triton kernels were applied.

    python bench/gpu_check.py              # on a CUDA machine
    python bench/gpu_check.py --dry-run    # anywhere: tiny shapes, 1+1 steps, CPU, checks the script end to end
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

ROOT = Path(__file__).resolve().parents[1]
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rope_theta=100000.0),
    "llama-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                     num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True, rope_theta=500000.0),
    # --dry-run only: runs on a CPU in seconds.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, rope_theta=10000.0),
}
BATCH, MAX_LEN, LR = 8, 1024, 2e-4


def make_data(path: Path, n: int, max_len: int, seed: int = 0) -> None:
    # Byte-level tokenizer: characters are tokens. Lengths log-normal like real chat data (many short, a long tail).
    rng = random.Random(seed)
    letters = "abcdefghijklmnopqrstuvwxyz     "
    rows = []
    for _ in range(n):
        total = int(min(max_len - 32, max(16, rng.lognormvariate(5.3, 0.7))))
        u = max(3, int(total * rng.uniform(0.2, 0.6)))
        rows.append({"messages": [
            {"role": "user", "content": "".join(rng.choice(letters) for _ in range(u))},
            {"role": "assistant", "content": "".join(rng.choice(letters) for _ in range(max(3, total - u)))},
        ]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def build_model_dir(shape: str, out: Path) -> int:
    """A Hugging Face folder with random weights of the given shape and the tests' tokenizer; returns its
    non-embedding parameter count (what MFU counts)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    sys.path.insert(0, str(ROOT / "tests"))
    from tiny import tiny_tokenizer

    tok = tiny_tokenizer()
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for n, p in model.named_parameters() if "embed" not in n and "lm_head" not in n)


def matmul_peak(device: str) -> float:
    import torch

    n = 8192 if device == "cuda" else 1024
    a = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    b = torch.randn(n, n, dtype=torch.bfloat16, device=device)
    for _ in range(3):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    reps = 10
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    if device == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * reps / (time.perf_counter() - t)


def plan_estimate(model_dir: Path, method: str, seq_len: int, batch: int, device: str) -> int | None:
    """`tunelab plan memory --json` for this case. On CUDA its `allocated_bytes` (what max_memory_allocated
    counts: no CUDA-context allowance); on CPU `total_bytes` (what RSS counts)."""
    cmd = [sys.executable, "-m", "tunelab.cli", "plan", "memory", str(model_dir), "--method", method,
           "--seq-len", str(seq_len), "--batch", str(batch), "--device", device, "--json"]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if p.returncode:
        return None
    try:
        out = json.loads(p.stdout)
        return int(out["allocated_bytes"] if device == "cuda" else out["total_bytes"])
    except (ValueError, KeyError, TypeError):
        return None


def worker(args: argparse.Namespace) -> None:
    import torch

    from tunelab.config import config_from_dict
    from tunelab.train.run import train
    from tunelab.train.tracking import read_metrics

    device = "cuda" if torch.cuda.is_available() else "cpu"
    liger = False
    if args.liger:
        # Kernels for RMSNorm, SwiGLU and RoPE; tunelab computes its own loss on kept positions, so the fused
        # linear+cross-entropy kernel (which replaces the model's forward) is left off.
        from liger_kernel.transformers import apply_liger_kernel_to_llama

        apply_liger_kernel_to_llama(rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
        liger = True
    with tempfile.TemporaryDirectory() as d:
        root = Path(d)
        params = build_model_dir(args.shape, root / "model")
        data = root / "data.jsonl"
        max_len = args.max_len
        make_data(data, args.examples, max_len)
        cfg = config_from_dict({
            "model": {"name": str(root / "model"), "dtype": "bf16"},
            "finetune": args.method, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
            "data": {"train": str(data), "max_seq_len": max_len, "check_contamination": False},
            "train": {"max_steps": args.warmup + args.steps, "batch_size": args.batch, "lr": LR, "warmup_ratio": 0.0,
                      "log_every": 1},
            "eval": {"baseline": False}, "output_dir": str(root / "out"),
        })
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
        train(cfg, overwrite=True, show_progress=False)
        rows = [r for r in read_metrics(root / "out") if "train_loss" in r]
        a, b = rows[args.warmup - 1], rows[-1]
        toks = b["tokens_seen"] - a["tokens_seen"]
        secs = b["elapsed_s"] - a["elapsed_s"]
        peak = (torch.cuda.max_memory_allocated() if device == "cuda"
                else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
        # What transformers picks for this folder on this device (tunelab's loader passes no override).
        from transformers import AutoConfig, AutoModelForCausalLM

        with torch.device("meta"):
            meta = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "model"))
        attn = str(meta.config._attn_implementation)
        est = plan_estimate(root / "model", args.method, max_len, args.batch, device)
    res = {"tokens_per_s": toks / secs, "final_loss": b["train_loss"], "peak_bytes": int(peak), "params": params,
           "matmul_peak": matmul_peak(device), "device": device, "liger": liger, "attention": attn,
           "plan_bytes": est}
    print("RESULT " + json.dumps(res), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="tiny shapes on whatever device, 1+1 steps")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--examples", type=int, default=256)
    ap.add_argument("--shapes", default="smollm2-135m,llama-1b")
    ap.add_argument("--methods", default="lora,qlora")
    ap.add_argument("--timeout", type=float, default=150, help="seconds allowed per case")
    # worker-only arguments
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--shape", help=argparse.SUPPRESS)
    ap.add_argument("--method", help=argparse.SUPPRESS)
    ap.add_argument("--liger", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=BATCH, help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, default=MAX_LEN, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker(a)
        return
    if a.dry_run:
        shapes, a.steps, a.warmup, a.examples, batch, max_len = ["tiny"], 1, 1, 16, 2, 128
    else:
        shapes, batch, max_len = a.shapes.split(","), BATCH, MAX_LEN
    try:
        import liger_kernel  # noqa: F401

        ligers = [False, True]
    except ImportError:
        ligers = [False]
        print("liger-kernel is not installed: its rows are left out (carry its wheel to add them)")
    rows: list[tuple[str, dict[str, Any] | str]] = []
    for shape in shapes:
        for method in a.methods.split(","):
            for liger in ligers:
                name = f"{shape} {method}{' +liger' if liger else ''}"
                cmd = [sys.executable, __file__, "--worker", "--shape", shape, "--method", method, "--steps",
                       str(a.steps), "--warmup", str(a.warmup), "--examples", str(a.examples), "--batch",
                       str(batch), "--max-len", str(max_len)] + (["--liger"] if liger else [])
                t0 = time.perf_counter()
                try:
                    p = subprocess.run(cmd, capture_output=True, text=True, timeout=a.timeout, cwd=ROOT,
                                       env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                except subprocess.TimeoutExpired:
                    rows.append((name, f"timed out after {a.timeout:.0f} s"))
                    continue
                line = [x for x in p.stdout.splitlines() if x.startswith("RESULT ")]
                if p.returncode or not line:
                    err = (p.stderr.strip().splitlines() or ["no output"])[-1]
                    rows.append((name, f"failed (rc {p.returncode}): {err[:160]}"))
                    sys.stderr.write(f"--- {name} ---\n{p.stderr[-4000:]}\n")
                else:
                    rows.append((name, json.loads(line[0][7:])))
                print(f"{name}: {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    print(f"\nSFT through tunelab's loop, batch {batch} packed, max length {max_len}, bf16, {a.steps} timed steps"
          f"{' (dry run)' if a.dry_run else ''}")
    print(f"{'case':24} {'tok/s':>9} {'MFU':>6} {'peak GiB':>9} {'plan GiB':>9} {'loss':>7} {'attention':>10} device")
    for name, r in rows:
        if isinstance(r, str):
            print(f"{name:24} {r}")
            continue
        # LoRA FLOPs per token: forward 2N + backward through activations 2N (frozen weights get no gradient).
        mfu = 4 * r["params"] * r["tokens_per_s"] / r["matmul_peak"]
        plan = f"{r['plan_bytes'] / 2**30:9.2f}" if r["plan_bytes"] else f"{'n/a':>9}"
        print(f"{name:24} {r['tokens_per_s']:9.0f} {100 * mfu:5.1f}% {r['peak_bytes'] / 2**30:9.2f} {plan} "
              f"{r['final_loss']:7.3f} {r['attention']:>10} {r['device']}")
    peaks = [r["matmul_peak"] for _, r in rows if not isinstance(r, str)]
    if peaks:
        print(f"bf16 matmul peak {max(peaks) / 1e12:.1f} TFLOP/s (measured in each case's process; the max shown)")
    if any(isinstance(r, str) for _, r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
