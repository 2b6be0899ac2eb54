"""The one training loop every method shares, readable top to bottom (`run_loop`).

It owns: data order and sharding across processes, gradient accumulation, loss normalisation, clipping,
the LR schedule, bf16 autocast, validation (baseline before the first step, then every N steps), overfitting
detection and early stopping, checkpoints and exact resume, metrics and the progress bar.

A training method (SFT, DPO, ...) plugs in by subclassing `Method`:
  - `expect`: which data family it reads ("conversation" or "preference");
  - `encode(record)`: one record -> one item (or None to drop it with a counted warning);
  - `collate(items)`: a micro-batch of items -> dict of tensors;
  - `count(batch)`: how many normalisation units (trained tokens, pairs) the micro-batch holds;
  - `loss(model, batch, num_items)`: returns (loss / num_items, metric sums). `num_items` covers the whole
    optimizer step across all micro-batches and processes, so accumulation and DDP equal one big batch;
  - `summarize(sums)`: summed metrics -> reported metrics (e.g. loss_sum / tokens);
  - optional hooks `setup(ctx)` (e.g. precompute reference log-probs) and `after_step(ctx)`.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.train import checkpoint as ckpt
from tunelab.train import fsdp


class Method(ABC):
    name: ClassVar[str] = "method"
    expect: ClassVar[str] = "conversation"
    primary_metric: ClassVar[str] = "loss"

    def __init__(self, cfg: RunConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer

    @abstractmethod
    def encode(self, record: Any) -> Any | None: ...

    @abstractmethod
    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    @abstractmethod
    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> tuple[torch.Tensor, dict[str, float]]: ...

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        return {"loss": sums.get("loss_sum", 0.0) / n}

    def setup(self, ctx: LoopContext) -> None:
        """Called once after the model is prepared and before the baseline evaluation."""

    def after_step(self, ctx: LoopContext) -> None:
        """Called after each optimizer step (e.g. AdaLoRA's rank reallocation)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors outside the adapter/model weights (e.g. a reward head), saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what extra_state() saved (called on resume, after setup())."""


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    step_in_epoch: int = 0
    tokens_seen: int = 0
    best_valid: float | None = None
    best_step: int | None = None
    bad_evals: int = 0
    stopped_early: bool = False
    last_train_loss: float | None = None
    train_loss_at_best: float | None = None


@dataclass
class LoopContext:
    cfg: RunConfig
    run_dir: Path
    model: Any
    tokenizer: Any
    accelerator: Any
    method: Method
    train_items: list[Any]
    valid_items: list[Any]
    total_steps: int
    steps_per_epoch: int
    state: LoopState = field(default_factory=LoopState)
    optimizer: Any = None
    scheduler: Any = None
    tracker: Any = None
    weights_name: str = "adapter"
    config_yaml: str = ""
    console: Any = None
    bf16: bool = False
    """Run forward passes under bf16 autocast (weights may stay fp32: full fine-tuning keeps fp32 masters)."""
    last_valid: dict[str, float] = field(default_factory=dict)
    on_checkpoint: Callable[[Path], None] | None = None
    """Called with each checkpoint's folder right after it is committed, before older ones rotate away."""
    sharded: bool = False
    """Weights sharded across processes with FSDP2 (train/fsdp.py): saving gathers, evaluation stays in step."""

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def unwrap(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    def gathered_weights(self) -> dict[str, torch.Tensor] | None:
        """Full weights of a sharded model (rank 0; every process must call this), else None: save the model's own."""
        return fsdp.full_model_state(self.model) if self.sharded else None


def global_batch(cfg: RunConfig, world: int) -> int:
    return cfg.train.batch_size * cfg.train.grad_accum * world


def plan_steps(cfg: RunConfig, n_train: int, world: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps)."""
    per_epoch = max(1, math.ceil(n_train / global_batch(cfg, world)))
    total = cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
    return per_epoch, total


def epoch_order(n: int, seed: int, epoch: int, world: int, gb: int) -> list[int]:
    """A seeded permutation per epoch; padded by wrapping when several processes need equal shares."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    if world > 1 and len(order) % gb:
        order += order[: gb - len(order) % gb]
    return order


def micro_batches(ctx: LoopContext, epoch: int, step_in_epoch: int) -> list[list[Any]]:
    """This process's micro-batches for one optimizer step."""
    cfg, acc = ctx.cfg, ctx.accelerator
    world, rank = acc.num_processes, acc.process_index
    gb = global_batch(cfg, world)
    order = epoch_order(len(ctx.train_items), cfg.train.seed, epoch, world, gb)
    step_ids = order[step_in_epoch * gb : (step_in_epoch + 1) * gb]
    mine = step_ids[rank::world]  # interleaved shards: rank r gets every world-th example
    bs = cfg.train.batch_size
    out = [[ctx.train_items[i] for i in mine[j : j + bs]] for j in range(0, len(mine), bs)]
    return [mb for mb in out if mb]


def lr_lambda(cfg: RunConfig, total: int) -> Any:
    warm = cfg.train.warmup_steps if cfg.train.warmup_steps is not None else math.ceil(cfg.train.warmup_ratio * total)

    def f(step: int) -> float:
        if step < warm:
            return (step + 1) / (warm + 1)
        if cfg.train.schedule == "constant":
            return 1.0
        progress = (step - warm) / max(1, total - warm)
        if cfg.train.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return f


def autocast(ctx: LoopContext) -> Any:
    dev = ctx.accelerator.device
    if ctx.bf16:
        return torch.autocast(device_type=dev.type, dtype=torch.bfloat16)
    return nullcontext()


def reduce_sums(ctx: LoopContext, sums: dict[str, float]) -> dict[str, float]:
    if ctx.accelerator.num_processes == 1:
        return sums
    keys = sorted(sums)
    t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=ctx.accelerator.device)
    t = ctx.accelerator.reduce(t, reduction="sum")
    return dict(zip(keys, t.tolist(), strict=True))


def _add(acc: dict[str, float], m: dict[str, float]) -> None:
    for k, v in m.items():
        acc[k] = acc.get(k, 0.0) + float(v)


@torch.no_grad()
def evaluate(ctx: LoopContext) -> dict[str, float]:
    """Validation metrics over this process's shard, summed across processes."""
    acc = ctx.accelerator
    items = ctx.valid_items[acc.process_index :: acc.num_processes]
    bs = ctx.cfg.train.batch_size
    ctx.model.eval()
    sums: dict[str, float] = {}
    for j in range(0, len(items), bs):
        batch = _to_device(ctx.method.collate(items[j : j + bs]), acc.device)
        with autocast(ctx):
            _, m = ctx.method.loss(ctx.model, batch, 1.0)
        _add(sums, m)
    if ctx.sharded:  # each forward gathers weights from every process: a shorter shard must keep in step
        for _ in range(fsdp.extra_eval_batches(len(ctx.valid_items), acc.num_processes, bs, len(items))):
            with autocast(ctx):
                ctx.method.loss(ctx.model, _to_device(ctx.method.collate(ctx.valid_items[:1]), acc.device), 1.0)
    ctx.model.train()
    return ctx.method.summarize(reduce_sums(ctx, sums))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(ctx: LoopContext, mbs: list[list[Any]]) -> dict[str, float]:
    """One optimizer step over this process's micro-batches. Returns summed metrics (all processes)."""
    acc, model, method = ctx.accelerator, ctx.model, ctx.method
    batches = [method.collate(mb) for mb in mbs]
    local_items = float(sum(method.count(b) for b in batches))
    total_items = reduce_sums(ctx, {"n": local_items})["n"]
    # DDP averages gradients over processes; scaling the normaliser by 1/world turns that into a sum.
    norm = max(total_items, 1.0) / acc.num_processes
    sums: dict[str, float] = {}
    for i, b in enumerate(batches):
        b = _to_device(b, acc.device)
        last = i == len(batches) - 1
        with (nullcontext() if last else acc.no_sync(model)), autocast(ctx):
            loss, m = method.loss(model, b, norm)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(ctx.state.step + 1)
        acc.backward(loss)
        _add(sums, m)
        ctx.state.tokens_seen += int(b.get("num_tokens", torch.tensor(0)).item())
    grad_norm = None
    if ctx.cfg.train.max_grad_norm is not None:
        grad_norm = acc.clip_grad_norm_(model.parameters(), ctx.cfg.train.max_grad_norm)
    ctx.optimizer.step()
    ctx.scheduler.step()
    if ctx.cfg.finetune == "adalora":  # rank reallocation reads the gradients: before zero_grad
        ctx.unwrap().base_model.update_and_allocate(ctx.state.step + 1)
    ctx.optimizer.zero_grad(set_to_none=True)
    out = reduce_sums(ctx, sums)
    if grad_norm is not None:
        gn = float(grad_norm)  # a DTensor under FSDP: float() gathers it
        if not math.isfinite(gn):
            raise NonFiniteLoss(ctx.state.step + 1, what="gradient norm")
        out["grad_norm"] = gn
    return out


class NonFiniteLoss(TunelabError):
    def __init__(self, step: int, what: str = "loss") -> None:
        super().__init__(f"{what} became NaN or infinite at step {step}", exit_code=3)
        self.step = step


def save_checkpoint(ctx: LoopContext) -> None:
    acc = ctx.accelerator
    acc.wait_for_everyone()
    weights = ctx.gathered_weights()
    optim = fsdp.full_optimizer_state(ctx.model, ctx.optimizer) if ctx.sharded else None
    if ctx.is_main:
        ckpt.write_checkpoint(
            ctx.run_dir, ctx.state.step, ctx.unwrap(), ctx.optimizer, ctx.scheduler, asdict(ctx.state),
            ctx.config_yaml, ctx.weights_name, ctx.cfg.train.keep_checkpoints, extra=ctx.method.extra_state(),
            on_commit=ctx.on_checkpoint, state_dict=weights, optimizer_state=optim,
        )
    acc.wait_for_everyone()


def after_eval(ctx: LoopContext, metrics: dict[str, float]) -> bool:
    """Track the best validation loss; warn on overfitting; return True to stop early."""
    st, cfg = ctx.state, ctx.cfg
    ctx.last_valid = metrics
    loss = metrics["loss"]
    if st.best_valid is None or loss < st.best_valid:
        st.best_valid, st.best_step, st.bad_evals = loss, st.step, 0
        st.train_loss_at_best = st.last_train_loss
        if cfg.train.early_stopping:
            weights = ctx.gathered_weights()
            if ctx.is_main:
                ckpt.save_weights(ctx.unwrap(), ctx.run_dir / "best" / ctx.weights_name, state_dict=weights)
        return False
    st.bad_evals += 1
    train_falling = (
        st.last_train_loss is not None and st.train_loss_at_best is not None and st.last_train_loss < st.train_loss_at_best
    )
    if st.bad_evals >= cfg.train.patience and train_falling:
        msg = (
            f"overfitting: validation loss has risen for {st.bad_evals} evaluations while training loss falls; "
            f"lowest validation loss {st.best_valid:.4f} was at step {st.best_step}"
        )
        if ctx.console is not None and ctx.is_main:
            ctx.console.print(f"[yellow]warning: {msg}[/yellow]")
        ctx.tracker.log({"step": st.step, "warning": msg})
        if cfg.train.early_stopping:
            st.stopped_early = True
            return True
    return False


def run_loop(ctx: LoopContext, progress: Any = None) -> LoopState:
    """The loop. Resumes from ctx.state (step/epoch/position) if it was loaded from a checkpoint."""
    cfg, st = ctx.cfg, ctx.state
    eval_every = cfg.train.eval_every or ctx.steps_per_epoch
    save_every = cfg.train.save_every
    has_valid = bool(ctx.valid_items)

    if st.step == 0 and has_valid and ctx.cfg.eval.baseline:
        m = evaluate(ctx)
        ctx.tracker.log({"step": 0, "baseline": True, **{f"valid_{k}": v for k, v in m.items()}})
        after_eval(ctx, m)

    task = progress.add_task("train", total=ctx.total_steps, completed=st.step) if progress else None
    t0, tokens0, window_loss = time.perf_counter(), st.tokens_seen, 0.0
    ctx.model.train()
    while st.step < ctx.total_steps:
        if st.step_in_epoch >= ctx.steps_per_epoch:
            st.epoch, st.step_in_epoch = st.epoch + 1, 0
        mbs = micro_batches(ctx, st.epoch, st.step_in_epoch)
        sums = train_step(ctx, mbs)
        st.step += 1
        st.step_in_epoch += 1
        ctx.method.after_step(ctx)
        rep = ctx.method.summarize(sums)
        st.last_train_loss = rep["loss"]
        window_loss = rep["loss"]
        elapsed = time.perf_counter() - t0
        tps = (st.tokens_seen - tokens0) * ctx.accelerator.num_processes / max(elapsed, 1e-9)
        lr = ctx.scheduler.get_last_lr()[0]
        if st.step % cfg.train.log_every == 0 or st.step == ctx.total_steps:
            row: dict[str, Any] = {"step": st.step, "epoch": round(st.epoch + st.step_in_epoch / ctx.steps_per_epoch, 4),
                                   "lr": lr, "tokens_per_s": round(tps, 1), "tokens_seen": st.tokens_seen,
                                   "elapsed_s": round(elapsed, 3)}
            row.update({f"train_{k}": v for k, v in rep.items()})
            if "grad_norm" in sums:
                row["grad_norm"] = sums["grad_norm"]
            ctx.tracker.log(row)
        if progress is not None:
            progress.update(task, completed=st.step, loss=window_loss, lr=lr, tps=tps)
        stop = False
        if has_valid and (st.step % eval_every == 0 or st.step == ctx.total_steps):
            m = evaluate(ctx)
            ctx.tracker.log({"step": st.step, **{f"valid_{k}": v for k, v in m.items()}})
            stop = after_eval(ctx, m)
        if save_every and st.step % save_every == 0 and st.step < ctx.total_steps:
            save_checkpoint(ctx)
        if stop:
            break
    return st
