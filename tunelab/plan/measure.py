"""`tunelab plan memory --measure`: three real training steps at the planned shape, and their peak memory.

The steps are tunelab's own: the model loaded and adapted as `tunelab train` does (load_model, apply_finetune,
build_optimizer, the SFT loss on a packed or padded batch, bf16 autocast where the loop uses it), on random
tokens that are all trained (the estimate's trained_fraction=1 worst case).

On CUDA the figure is torch.cuda.max_memory_allocated. On CPU it is the loaded model's own tensor bytes plus
the growth of the process's resident memory over the loaded model: anonymous RSS sampled every millisecond
on a thread, and the kernel's high-water mark reset just before the first step (/proc/self/clear_refs), the
larger of the two. glibc's mmap threshold is fixed first so that freed tensors leave the RSS (the analogue of
allocated rather than reserved memory on CUDA). Counting the model by its tensors rather than by RSS keeps out the file pages that loading
maps and leaves behind.
"""

from __future__ import annotations

import ctypes
import gc
import threading
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError
from tunelab.plan.memory import Shape


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


class _Sampler:
    """Max anonymous RSS (bytes) seen while running, sampled on a thread."""

    def __init__(self, every_s: float = 0.001) -> None:
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _read(self) -> int:
        kib = _status_kib("RssAnon")
        if kib is None:
            import psutil

            return int(psutil.Process().memory_info().rss)
        return kib * 1024

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._read())
            time.sleep(self.every_s)

    def __enter__(self) -> _Sampler:
        self.peak = self._read()
        self._t.start()
        return self

    def __exit__(self, *a: Any) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._read())


def _trim() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back so the baseline is what is in use
    except (OSError, AttributeError):
        pass


def _fixed_mmap_threshold() -> None:
    """Serve large blocks by mmap and return them on free, as a CUDA-style "allocated" figure needs: glibc's
    dynamic threshold otherwise keeps freed tensors on its heap, and RSS then counts memory no tensor holds."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD (setting it also turns the dynamic threshold off)
        libc.mallopt(-1, 128 * 1024)  # M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def tensor_bytes(model: Any) -> int:
    """Bytes of every distinct storage behind the model's parameters and buffers (4-bit states included)."""
    seen: dict[int, int] = {}
    for t in [*model.parameters(), *model.buffers()]:
        st = t.untyped_storage()
        seen[st.data_ptr()] = st.nbytes()
        qs = getattr(t, "quant_state", None)
        for extra in (getattr(qs, "absmax", None), getattr(getattr(qs, "state2", None), "absmax", None)):
            if extra is not None:
                seen[extra.untyped_storage().data_ptr()] = extra.untyped_storage().nbytes()
    return sum(seen.values())


def measure(model_name: str, s: Shape, steps: int = 3, seed: int = 0) -> dict[str, Any]:
    """Run `steps` optimizer steps at shape `s`; returns measured_bytes and how it was taken."""
    import torch

    from tunelab.config import config_from_dict
    from tunelab.data.templates import Encoded
    from tunelab.model.adapters import apply_finetune
    from tunelab.model.loading import bf16_supported, load_model
    from tunelab.train.run import build_optimizer
    from tunelab.train.sft import SFT

    if s.optimizer == "adamw8bit":
        raise TunelabError("--measure runs tunelab's own optimizers (adamw, paged_adamw); adamw8bit is estimate-only", 2)
    if s.processes > 1:
        raise TunelabError("--measure runs one process; measure a multi-process run with `tunelab train`", 2)
    cuda = torch.cuda.is_available()
    if s.device == "cuda" and not cuda:
        raise TunelabError("--measure on --device cuda needs a CUDA device; this machine has none (use --device cpu)", 2)
    raw: dict[str, Any] = {
        "model": {"name": model_name, "dtype": s.dtype}, "finetune": s.method,
        "lora": {"r": s.lora_r, "alpha": 2 * s.lora_r, "dropout": s.lora_dropout,
                 "target_modules": list(s.lora_targets) if s.lora_targets else "all-linear"},
        "data": {"train": "unused.jsonl", "max_seq_len": max(8, s.seq_len), "packing": s.packing},
        "train": {"batch_size": s.batch, "gradient_checkpointing": s.grad_ckpt, "optimizer": s.optimizer,
                  "max_steps": steps, "loss_chunk": s.loss_chunk},
    }
    cfg = config_from_dict(raw, "plan memory --measure")
    device = "cuda" if s.device == "cuda" else "cpu"
    torch.manual_seed(seed)
    if device == "cpu":
        _fixed_mmap_threshold()
    _trim()
    full = s.method == "full"
    dtype = "fp32" if full and s.dtype == "auto" else s.dtype
    model, tok = load_model(model_name, dtype=dtype, load_in_4bit=s.method == "qlora", device=device)
    model = apply_finetune(model, s.method, cfg.lora, total_steps=steps, gradient_checkpointing=s.grad_ckpt)
    model.train()
    # Weights loaded in the file's dtype stay mapped from the safetensors file: the first optimizer step writes
    # them, copy-on-write turns them into anonymous pages, and RSS growth would count the weights twice.
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.device.type == "cpu":
                p.data = p.data.clone()
    method = SFT(cfg, tok)
    vocab = int(model.get_input_embeddings().weight.shape[0])
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(steps):
        items = []
        for _ in range(s.batch):
            ids = torch.randint(0, vocab, (s.seq_len,), generator=g).tolist()
            items.append(Encoded(input_ids=ids, labels=list(ids)))
        batches.append({k: v.to(device) for k, v in method.collate(items).items()})
    optimizer = build_optimizer(cfg, model, None)
    # The loop's rule (train/run.py): bf16 autocast when the config allows it and the device runs bf16.
    bf16 = s.dtype in ("auto", "bf16") and bf16_supported(torch.device(device))
    model_bytes = tensor_bytes(model)
    _trim()
    if cuda and device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_anon = (_status_kib("RssAnon") or 0) * 1024
    base_rss = (_status_kib("VmRSS") or 0) * 1024
    hwm_ok = _reset_hwm()
    t0 = time.perf_counter()
    with _Sampler() as sampler:
        for batch in batches:
            with torch.autocast(device_type=device, dtype=torch.bfloat16) if bf16 else nullcontext():
                loss, _ = method.loss(model, batch, float(batch["targets"].numel()))
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    secs = time.perf_counter() - t0
    out: dict[str, Any] = {"steps": steps, "seconds_per_step": secs / steps, "loss": float(loss.item())}
    if device == "cuda":
        out["measured_bytes"] = int(torch.cuda.max_memory_allocated())
        out["how"] = "torch.cuda.max_memory_allocated"
        return out
    sampled = sampler.peak - base_anon
    hwm = ((_status_kib("VmHWM") or 0) * 1024 - base_rss) if hwm_ok else 0
    growth = max(sampled, hwm)
    out.update(measured_bytes=int(model_bytes + growth), model_tensor_bytes=model_bytes, rss_growth_bytes=int(growth),
               sampled_growth_bytes=int(sampled), hwm_growth_bytes=int(hwm),
               how="model tensor bytes + peak RSS growth over the loaded model (sampled RssAnon, VmHWM)")
    return out
