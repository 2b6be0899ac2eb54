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
        lora_targets=targets, lora_dropout=cfg.lora.dropout, device="cuda" if device == "cuda" else "cpu",
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
