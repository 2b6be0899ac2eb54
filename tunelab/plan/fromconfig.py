"""The memory estimate for a run config: what `tunelab train` prints before step 1."""

from __future__ import annotations

from typing import Any

from tunelab.config import RunConfig
from tunelab.plan.memory import Estimate, Shape, estimate


def shape_for(cfg: RunConfig, device: str, processes: int = 1) -> Shape:
    import torch

    from tunelab.model.loading import bf16_supported

    targets = None if cfg.lora.target_modules == "all-linear" else tuple(cfg.lora.target_modules)
    method: Any = "lora" if cfg.finetune == "adalora" else cfg.finetune
    return Shape(
        method=method, seq_len=cfg.data.max_seq_len, batch=cfg.train.batch_size,
        grad_ckpt=cfg.train.gradient_checkpointing, optimizer=cfg.train.optimizer, dtype=cfg.model.dtype,
        packing=cfg.data.packing, processes=processes, fsdp=cfg.train.fsdp and processes > 1,
        grad_accum=cfg.train.grad_accum, lora_r=cfg.lora.init_r if cfg.finetune == "adalora" else cfg.lora.r,
        lora_targets=targets, lora_dropout=cfg.lora.dropout, loss_chunk=cfg.train.loss_chunk, device="cuda" if device == "cuda" else "cpu",
        bf16_ok=bf16_supported(torch.device(device)),
    )


def estimate_for_config(cfg: RunConfig, device: str, processes: int = 1) -> Estimate:
    from tunelab.plan.arch import load_arch

    return estimate(load_arch(cfg.model.name), shape_for(cfg, device, processes))


def free_bytes(device: str) -> int:
    """Memory free for this process now: the card's free memory, or the machine's available RAM."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


def report_estimate(cfg: RunConfig, device: str, processes: int, console: Any) -> Estimate | None:
    """Print the peak-memory estimate before step 1, and a warning when it exceeds the free memory now.
    SFT only (preference and RL methods hold reference models and heads the estimate does not model). An
    estimate that cannot be made is said in one dim line and never stops training."""
    if cfg.method != "sft":
        return None
    try:
        est = estimate_for_config(cfg, device, processes)
        free = free_bytes(device)
    except Exception as e:  # the estimate is advice: a model it cannot read must not block the run
        console.print(f"[dim]memory estimate unavailable: {getattr(e, 'message', e)}[/dim]")
        return None
    console.print(f"memory estimate: {est.total_bytes / 1e9:.2f} GB peak per process (weights "
                  f"{est.weights_bytes / 1e9:.2f}, activations {est.activations_bytes / 1e9:.2f}, logits "
                  f"{est.logits_bytes / 1e9:.2f}, optimizer {est.optimizer_bytes / 1e9:.2f}); "
                  f"see `tunelab plan memory` for the breakdown")
    if est.total_bytes > free:
        console.print(f"[yellow]warning: the estimate ({est.total_bytes / 1e9:.2f} GB) exceeds the free "
                      f"{'GPU' if device == 'cuda' else 'RAM'} memory ({free / 1e9:.2f} GB): lower train.batch_size "
                      "or data.max_seq_len, or turn on train.gradient_checkpointing[/yellow]")
    return est
