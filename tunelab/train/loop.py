"""The one training loop every method shares, readable top to bottom (`run_loop`).

It owns: data order and sharding across processes, gradient accumulation, loss normalisation, clipping,
the LR schedule, bf16 autocast, validation (baseline before the first step, then every N steps), the best
step and early stopping in the direction of the method's validation metric, overfitting detection,
checkpoints and exact resume, metrics and the progress bar.

A loop step hands the method one global batch of examples (this process's share, as micro-batches). Methods
come in two shapes, both subclasses of `TrainingMethod`:

`Method` -- a loss per micro-batch (SFT, DPO, ORPO, SimPO, KTO, reward models). One loop step is one optimizer
step (`train_step`):
  - `expect`: which data family it reads ("conversation" or "preference");
  - `encode(record)`: one record -> one item (or None to drop it with a counted warning);
  - `collate(items)`: a micro-batch of items -> dict of tensors;
  - `count(batch)`: how many normalisation units (trained tokens, pairs) the micro-batch holds;
  - `loss(model, batch, num_items)`: returns (loss / num_items, metric sums). `num_items` covers the whole
    optimizer step across all micro-batches and processes, so accumulation and DDP equal one big batch;
  - `summarize(sums)`: summed metrics -> reported metrics (e.g. loss_sum / tokens).

`RolloutMethod` (tunelab/train/rollout.py) -- online RL (PPO, GRPO): one loop step rolls out every prompt it
is handed (`collect`), then takes several optimizer steps on that experience (`optimize`); validation is the
reward of sampled completions, higher is better (`valid_metric`, `higher_is_better`).

Both may use the hooks `setup(ctx)` (e.g. precompute reference log-probs) and `after_step(ctx)` (after each
loop step). Fine-tuning modes plug in through `StepHook`s in `ctx.hooks`, called at every optimizer step
(AdaLoRA's rank reallocation: tunelab/train/hooks.py); the loop itself knows no fine-tuning mode.
"""

from __future__ import annotations

import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from tunelab.config import RunConfig
from tunelab.errors import TunelabError
from tunelab.rundir import RunDir, TrainEvent, ValidEvent, WarningEvent
from tunelab.train import checkpoint as ckpt
from tunelab.train import fsdp


class TrainingMethod(ABC):
    """What every method has; see `Method` (a loss per micro-batch) and `RolloutMethod` (online RL)."""

    name: ClassVar[str] = "method"
    expect: ClassVar[str] = "conversation"
    valid_metric: ClassVar[str] = "loss"
    """The validation metric that picks the best step and drives early stopping."""
    higher_is_better: ClassVar[bool] = False

    def __init__(self, cfg: RunConfig, tokenizer: Any) -> None:
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.pre_encoded: dict[int, Any] = {}
        """id(record) -> its encoding from data validation (same tokenizer and rule), while the run encodes its
        records: the data is tokenized once per run. Methods that encode differently ignore it."""

    @abstractmethod
    def encode(self, record: Any) -> Any | None: ...

    @abstractmethod
    def run_step(self, ctx: LoopContext, mbs: list[list[Any]]) -> dict[str, float]:
        """One loop step over this process's micro-batches; returns metric sums over all processes."""

    @abstractmethod
    def validate(self, ctx: LoopContext) -> dict[str, float]:
        """Validation metrics (including `valid_metric`) over ctx.valid_items, the same on every process."""

    @property
    def optimizer_steps_per_step(self) -> int:
        """Optimizer (and LR-schedule) steps one loop step takes."""
        return 1

    def summarize(self, sums: dict[str, float]) -> dict[str, float]:
        n = max(sums.get("items", 0.0), 1.0)
        return {"loss": sums.get("loss_sum", 0.0) / n}

    def setup(self, ctx: LoopContext) -> None:
        """Called once after the model is prepared and before the baseline evaluation."""

    def after_step(self, ctx: LoopContext) -> None:
        """Called after each loop step (e.g. write a reward head next to the adapter)."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Trainable tensors outside the adapter/model weights (e.g. a reward head), saved in checkpoints."""
        return {}

    def load_extra_state(self, state: dict[str, torch.Tensor]) -> None:
        """Restore what extra_state() saved (called on resume, after setup())."""


class Method(TrainingMethod):
    """A method trained through a loss per micro-batch: one loop step is one optimizer step."""

    @abstractmethod
    def collate(self, items: list[Any]) -> dict[str, torch.Tensor]: ...

    @abstractmethod
    def count(self, batch: dict[str, torch.Tensor]) -> int: ...

    @abstractmethod
    def loss(self, model: Any, batch: dict[str, torch.Tensor], num_items: float) -> tuple[torch.Tensor, dict[str, float]]: ...

    def run_step(self, ctx: LoopContext, mbs: list[list[Any]]) -> dict[str, float]:
        return train_step(ctx, mbs)

    def validate(self, ctx: LoopContext) -> dict[str, float]:
        return evaluate(ctx)


class StepHook(Protocol):
    """Called at every optimizer step, after `optimizer.step()` and before the gradients are cleared."""

    def on_optimizer_step(self, ctx: LoopContext) -> None: ...


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
    last_train_metric: float | None = None
    """The training-side value of the validation metric (train loss; for RL the train reward)."""
    train_metric_at_best: float | None = None
    valid_metric: str = "loss"
    higher_is_better: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoopState:
        """Load a saved state, also one written before the fields were named after the metric."""
        d = dict(d)
        for old, new in (("last_train_loss", "last_train_metric"), ("train_loss_at_best", "train_metric_at_best")):
            if old in d:
                d.setdefault(new, d.pop(old))
        return cls(**d)

    def describe_best(self) -> str | None:
        """e.g. "best validation reward 0.6100 at step 4" (None before any evaluation)."""
        if self.best_step is None or self.best_valid is None:
            return None
        return f"best validation {self.valid_metric} {self.best_valid:.4f} at step {self.best_step}"


@dataclass
class LoopContext:
    cfg: RunConfig
    run_dir: Path
    model: Any
    tokenizer: Any
    accelerator: Any
    method: TrainingMethod
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
    hooks: list[StepHook] = field(default_factory=list)
    """Called at every optimizer step (fine-tuning modes: see tunelab/train/hooks.py)."""

    @property
    def is_main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    def unwrap(self) -> Any:
        return self.accelerator.unwrap_model(self.model)

    @property
    def total_optimizer_steps(self) -> int:
        """The LR schedule's length: loop steps times the optimizer steps each takes."""
        return self.total_steps * self.method.optimizer_steps_per_step

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
    acc, method = ctx.accelerator, ctx.method
    assert isinstance(method, Method)
    items = ctx.valid_items[acc.process_index :: acc.num_processes]
    bs = ctx.cfg.train.batch_size
    ctx.model.eval()
    sums: dict[str, float] = {}
    for j in range(0, len(items), bs):
        batch = to_device(method.collate(items[j : j + bs]), acc.device)
        with autocast(ctx):
            _, m = method.loss(ctx.model, batch, 1.0)
        _add(sums, m)
    if ctx.sharded:  # each forward gathers weights from every process: a shorter shard must keep in step
        for _ in range(fsdp.extra_eval_batches(len(ctx.valid_items), acc.num_processes, bs, len(items))):
            with autocast(ctx):
                method.loss(ctx.model, to_device(method.collate(ctx.valid_items[:1]), acc.device), 1.0)
    ctx.model.train()
    return method.summarize(reduce_sums(ctx, sums))


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def train_step(ctx: LoopContext, mbs: list[list[Any]]) -> dict[str, float]:
    """One optimizer step over this process's micro-batches. Returns summed metrics (all processes)."""
    acc, model, method = ctx.accelerator, ctx.model, ctx.method
    assert isinstance(method, Method)
    batches = [method.collate(mb) for mb in mbs]
    local_items = float(sum(method.count(b) for b in batches))
    total_items = reduce_sums(ctx, {"n": local_items})["n"]
    # DDP averages gradients over processes; scaling the normaliser by 1/world turns that into a sum.
    norm = max(total_items, 1.0) / acc.num_processes
    sums: dict[str, float] = {}
    for i, b in enumerate(batches):
        b = to_device(b, acc.device)
        last = i == len(batches) - 1
        with (nullcontext() if last else acc.no_sync(model)), autocast(ctx):
            loss, m = method.loss(model, b, norm)
        if not torch.isfinite(loss):
            raise NonFiniteLoss(ctx.state.step + 1)
        acc.backward(loss)
        _add(sums, m)
        ctx.state.tokens_seen += int(b.get("num_tokens", torch.tensor(0)).item())
    grad_norm = optimizer_step(ctx)
    out = reduce_sums(ctx, sums)
    if grad_norm is not None:
        out["grad_norm"] = grad_norm
    return out


def optimizer_step(ctx: LoopContext) -> float | None:
    """Clip, step the optimizer and the LR schedule, run the step hooks, clear the gradients.
    Returns the gradient norm before clipping (None when clipping is off)."""
    grad_norm = None
    if ctx.cfg.train.max_grad_norm is not None:
        grad_norm = ctx.accelerator.clip_grad_norm_(ctx.model.parameters(), ctx.cfg.train.max_grad_norm)
    ctx.optimizer.step()
    ctx.scheduler.step()
    for hook in ctx.hooks:  # before zero_grad: a hook may read the gradients (a rank reallocation does)
        hook.on_optimizer_step(ctx)
    ctx.optimizer.zero_grad(set_to_none=True)
    if grad_norm is None:
        return None
    gn = float(grad_norm)  # a DTensor under FSDP: float() gathers it
    if not math.isfinite(gn):
        raise NonFiniteLoss(ctx.state.step + 1, what="gradient norm")
    return gn


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


def _better(a: float, b: float, higher: bool) -> bool:
    return a > b if higher else a < b


def after_eval(ctx: LoopContext, metrics: dict[str, float]) -> bool:
    """Track the best value of the method's validation metric (lowest loss, or highest reward for RL); warn on
    overfitting (validation getting worse while training gets better); return True to stop early."""
    st, cfg, method = ctx.state, ctx.cfg, ctx.method
    key, higher = method.valid_metric, method.higher_is_better
    st.valid_metric, st.higher_is_better = key, higher
    ctx.last_valid = metrics
    value = metrics[key]
    if st.best_valid is None or _better(value, st.best_valid, higher):
        st.best_valid, st.best_step, st.bad_evals = value, st.step, 0
        st.train_metric_at_best = st.last_train_metric
        if cfg.train.early_stopping:
            weights = ctx.gathered_weights()
            if ctx.is_main:
                ckpt.save_weights(ctx.unwrap(), RunDir(ctx.run_dir).best_dir(ctx.weights_name), state_dict=weights)
        return False
    st.bad_evals += 1
    train_improving = (
        st.last_train_metric is not None and st.train_metric_at_best is not None
        and _better(st.last_train_metric, st.train_metric_at_best, higher)
    )
    if st.bad_evals >= cfg.train.patience and train_improving:
        worse, better, best = ("fallen", "rises", "highest") if higher else ("risen", "falls", "lowest")
        msg = (
            f"overfitting: validation {key} has {worse} for {st.bad_evals} evaluations while training {key} "
            f"{better}; {best} validation {key} {st.best_valid:.4f} was at step {st.best_step}"
        )
        if ctx.console is not None and ctx.is_main:
            ctx.console.print(f"[yellow]warning: {msg}[/yellow]")
        ctx.tracker.log(WarningEvent(st.step, msg))
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
    method = ctx.method
    st.valid_metric, st.higher_is_better = method.valid_metric, method.higher_is_better

    if st.step == 0 and has_valid and ctx.cfg.eval.baseline:
        m = method.validate(ctx)
        ctx.tracker.log(ValidEvent(0, m, baseline=True))
        after_eval(ctx, m)

    task = progress.add_task("train", total=ctx.total_steps, completed=st.step) if progress else None
    t0, tokens0, window_loss = time.perf_counter(), st.tokens_seen, 0.0
    ctx.model.train()
    while st.step < ctx.total_steps:
        if st.step_in_epoch >= ctx.steps_per_epoch:
            st.epoch, st.step_in_epoch = st.epoch + 1, 0
        mbs = micro_batches(ctx, st.epoch, st.step_in_epoch)
        sums = method.run_step(ctx, mbs)
        st.step += 1
        st.step_in_epoch += 1
        method.after_step(ctx)
        rep = method.summarize(sums)
        st.last_train_metric = rep.get(method.valid_metric)
        window_loss = rep.get("loss", math.nan)
        elapsed = time.perf_counter() - t0
        tps = (st.tokens_seen - tokens0) * ctx.accelerator.num_processes / max(elapsed, 1e-9)
        lr = ctx.scheduler.get_last_lr()[0]
        if st.step % cfg.train.log_every == 0 or st.step == ctx.total_steps:
            ctx.tracker.log(TrainEvent(
                st.step, rep, epoch=round(st.epoch + st.step_in_epoch / ctx.steps_per_epoch, 4), lr=lr,
                tokens_per_s=round(tps, 1), tokens_seen=st.tokens_seen, elapsed_s=round(elapsed, 3),
                grad_norm=sums.get("grad_norm")))
        if progress is not None:
            progress.update(task, completed=st.step, loss=window_loss, lr=lr, tps=tps)
        stop = False
        if has_valid and (st.step % eval_every == 0 or st.step == ctx.total_steps):
            m = method.validate(ctx)
            ctx.tracker.log(ValidEvent(st.step, m))
            stop = after_eval(ctx, m)
        if save_every and st.step % save_every == 0 and st.step < ctx.total_steps:
            save_checkpoint(ctx)
        if stop:
            break
    return st
