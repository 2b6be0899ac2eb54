"""`tunelab train`: from a validated RunConfig to a finished run folder.

Sets up everything around the loop (data validation and encoding, model and adapters, optimizer, schedule,
resume, tracking, outputs) and hands over to `tunelab.train.loop.run_loop`.

The run folder's layout (config.yaml, manifest.json, metrics.jsonl, state.json, tokenizer/, adapter/ or model/,
checkpoints/step-N/ ...) is owned by `tunelab.rundir.RunDir`.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import platform
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.config import RunConfig, dump_config
from tunelab.data.readers import read_records
from tunelab.data.records import Record
from tunelab.data.templates import Encoded
from tunelab.data.validate import validate_file
from tunelab.errors import DataError, TunelabError
from tunelab.model.adapters import apply_finetune
from tunelab.model.loading import bf16_supported, describe_parameters, load_model
from tunelab.rundir import ResumeEvent, RunDir, weights_name
from tunelab.train import checkpoint as ckpt
from tunelab.train import fsdp, mix
from tunelab.train.fastpath import prepare_for_speed
from tunelab.train.hooks import finetune_hooks
from tunelab.train.loop import (
    LoopContext,
    LoopState,
    NonFiniteLoss,
    TrainingMethod,
    lr_lambda,
    plan_steps,
    run_loop,
)
from tunelab.train.tracking import Tracker, plot_loss

# method name -> "module:Class". Each method is one readable file over the shared loop.
METHODS: dict[str, str] = {
    "sft": "tunelab.train.sft:SFT",
    "reward": "tunelab.train.reward:Reward",
    "dpo": "tunelab.train.dpo:DPO",
    "orpo": "tunelab.train.orpo:ORPO",
    "simpo": "tunelab.train.simpo:SimPO",
    "kto": "tunelab.train.kto:KTO",
    "ppo": "tunelab.train.ppo:PPO",
    "grpo": "tunelab.train.grpo:GRPO",
}


def method_class(name: str) -> type[TrainingMethod]:
    if name not in METHODS:
        raise TunelabError(f"unknown method {name!r} (available: {', '.join(sorted(METHODS))})", 2)
    mod, cls = METHODS[name].split(":")
    klass = getattr(importlib.import_module(mod), cls)
    assert issubclass(klass, TrainingMethod)
    return klass


@dataclass
class RunResult:
    run_dir: Path
    state: LoopState
    final_valid: dict[str, float]
    resumed_from: dict[str, Any] | None = None
    """On resume: the checkpoint step and data position (epoch, step_in_epoch, tokens_seen) training continued from."""


def sha256_file(p: str | Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _load_split(path: str, expect: str, cfg: RunConfig, tok: Any, console: Any, min_examples: int,
                encoded: dict[int, Encoded] | None) -> list[Record]:
    """The same validation as `tunelab data validate`, with the run's own train_on and system_prompt; errors
    refuse the run, warnings are summarised. The file is parsed and tokenized once: the records come from the
    validation, and so do their encodings (added to `encoded`, by id(record), for the method to reuse)."""
    d = cfg.data
    rep = validate_file(path, tok, d.max_seq_len, expect=expect, min_examples=min_examples, train_on=d.train_on,
                        system_prompt=d.system_prompt)
    if rep.errors:
        raise DataError(rep.issues, header=f"{path}: invalid data (run `tunelab data validate {path}`)")
    if rep.warnings and console is not None:
        console.print(f"[yellow]{path}: {len(rep.warnings)} warning(s)[/yellow] (e.g. {rep.warnings[0]})")
    if encoded is not None:
        encoded.update(rep.encoded)
    return rep.records


def load_data(cfg: RunConfig, expect: str, tok: Any, console: Any,
              encoded: dict[int, Encoded] | None = None, model: Any = None) -> tuple[list[Record], list[Record]]:
    """Train and validation records; with `data.mix`, the general examples added to train (answered by `model`,
    the base before any training, under `data.mix.answers: self`)."""
    d = cfg.data
    train = _load_split(d.train, expect, cfg, tok, console, d.min_examples, encoded)
    valid = _load_split(d.validation, expect, cfg, tok, console, 1, encoded) if d.validation else []
    if not valid and d.validation_fraction > 0:
        from tunelab.data.convert import split_records

        train, valid = split_records(train, (1 - d.validation_fraction, d.validation_fraction), seed=cfg.train.seed)
    if d.mix is not None:
        picks = mix.draw(d.mix, len(train), expect, cfg.train.seed)
        if d.mix.answers == "self":
            picks = mix.self_answers(picks, d.mix, model, tok, d.system_prompt, RunDir(cfg.output_dir).mix_answers_path, expect,
                                     log=console.print if console is not None else None)
        train = train + picks
    return train, valid


def warn_contamination(cfg: RunConfig, expect: str, train: list[Record], valid: list[Record], console: Any) -> None:
    """Evaluation examples that also sit in training make every later score meaningless: say so up front."""
    from tunelab.data.toolkit.contamination import check_overlap

    held_out = [("validation", valid)]
    if cfg.data.test:
        held_out.append(("test", read_records(cfg.data.test, expect=expect)))
    for name, recs in held_out:
        if not recs:
            continue
        rep = check_overlap(train, recs)
        leaked = sorted({lk.eval_line for lk in rep.leaks if lk.eval_line is not None})
        if leaked:
            ex = rep.leaks[0]
            console.print(
                f"[yellow]warning: {len(leaked)} {name} example(s) overlap the training data "
                f"(e.g. {name} line {ex.eval_line} ~ train line {ex.train_line}, {ex.method} {ex.score}); "
                f"run `tunelab data contamination` for the full list[/yellow]"
            )


def _encode_all(method: TrainingMethod, records: list[Record], what: str, console: Any) -> list[Any]:
    items = [method.encode(r) for r in records]
    kept = [i for i in items if i is not None]
    dropped = len(items) - len(kept)
    if dropped and console is not None:
        console.print(f"[yellow]{what}: {dropped} example(s) have no trained tokens after truncation; skipped[/yellow]")
    truncated = sum(1 for i in kept if getattr(i, "truncated", False))
    if truncated and console is not None:
        console.print(f"[yellow]{what}: {truncated} example(s) truncated to max_seq_len[/yellow]")
    return kept


def build_optimizer(cfg: RunConfig, model: Any, console: Any) -> torch.optim.Optimizer:
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "norm" in n.lower() or n.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.train.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # QLoRA's paged AdamW is chosen in the config (the resolved config.yaml says so), never switched here.
    wants_paged = cfg.train.optimizer == "paged_adamw"
    if wants_paged and torch.cuda.is_available():
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW(groups, lr=cfg.train.lr)
    if cfg.train.optimizer == "paged_adamw" and console is not None:
        console.print("[dim]notice: paged AdamW needs CUDA unified memory; using plain AdamW on this device[/dim]")
    return torch.optim.AdamW(groups, lr=cfg.train.lr, fused=False)


def write_manifest(run_dir: Path, cfg: RunConfig, config_yaml: str) -> None:
    import accelerate
    import peft
    import transformers

    import tunelab

    files = {k: v for k, v in {"train": cfg.data.train, "validation": cfg.data.validation, "test": cfg.data.test,
                                "mix": cfg.data.mix.path if cfg.data.mix else None}.items() if v}
    manifest = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seed": cfg.train.seed,
        "config_sha256": hashlib.sha256(config_yaml.encode()).hexdigest(),
        "data": {k: {"path": v, "sha256": sha256_file(v)} for k, v in files.items()},
        "versions": {"tunelab": tunelab.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__, "accelerate": accelerate.__version__, "python": platform.python_version()},
        "command": " ".join(sys.argv),
    }
    RunDir(run_dir).manifest_path.write_text(json.dumps(manifest, indent=1))


def prepare_run_dir(cfg: RunConfig, resume: bool, overwrite: bool) -> Path:
    run_dir = Path(cfg.output_dir)
    existing = run_dir.exists() and any(run_dir.iterdir())
    if existing and not resume:
        if not overwrite:
            raise TunelabError(
                f"{run_dir} already holds a run; continue it with `tunelab train --resume {run_dir}`, "
                "pick another output_dir, or pass --overwrite to replace it", 2)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def train(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, console: Any = None,
          show_progress: bool = True, on_checkpoint: Callable[[Path], None] | None = None) -> RunResult:
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    # cpu=True is what lets accelerate form a gloo process group under torchrun on machines without CUDA.
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    fsdp.check_supported(accelerator)
    sharded = fsdp.active(cfg, accelerator)
    is_main = accelerator.is_main_process
    con = console if is_main else None
    run_dir = prepare_run_dir(cfg, resume, overwrite) if is_main else Path(cfg.output_dir)
    accelerator.wait_for_everyone()
    set_seed(cfg.train.seed)
    klass = method_class(cfg.method)
    if con is not None:
        from tunelab.plan.fromconfig import report_estimate

        report_estimate(cfg, accelerator.device.type, accelerator.num_processes, con)

    # Model first: validation needs the real tokenizer and chat template.
    full = cfg.finetune == "full"
    dtype = "fp32" if full and cfg.model.dtype == "auto" else cfg.model.dtype  # full FT keeps fp32 masters
    model, tok = load_model(cfg.model.name, dtype=dtype, load_in_4bit=cfg.finetune == "qlora",
                            double_quant=cfg.model.double_quant, trust_remote_code=cfg.model.trust_remote_code,
                            gguf_file=cfg.model.gguf_file, device=None if cfg.finetune == "qlora" else str(accelerator.device))
    method = klass(cfg, tok)
    method.pre_encoded = {}
    train_recs, valid_recs = load_data(cfg, method.expect, tok, con, method.pre_encoded, model=model)
    if cfg.data.check_contamination and con is not None:
        warn_contamination(cfg, method.expect, train_recs, valid_recs, con)
    train_items = _encode_all(method, train_recs, "train", con)
    valid_items = _encode_all(method, valid_recs, "validation", con)
    method.pre_encoded = {}  # the ids are only meaningful while those records live
    if cfg.train.eval_max_examples:
        valid_items = valid_items[: cfg.train.eval_max_examples]
    if not train_items:
        raise TunelabError(f"{cfg.data.train}: no trainable examples", 1)
    steps_per_epoch, total_steps = plan_steps(cfg, len(train_items), accelerator.num_processes)
    schedule_steps = total_steps * method.optimizer_steps_per_step  # RL takes several optimizer steps per step

    model = apply_finetune(
        model, cfg.finetune, cfg.lora, total_steps=schedule_steps, gradient_checkpointing=cfg.train.gradient_checkpointing)
    model = prepare_for_speed(model, cfg)
    if con is not None:
        con.print(f"[bold]{cfg.model.name}[/bold] · {cfg.finetune} · {cfg.method} · {describe_parameters(model)}")
    if sharded:
        model = fsdp.shard(model)  # before the optimizer: it must hold the sharded parameters
        if con is not None:
            con.print(f"weights, gradients and optimizer state sharded (FSDP2) across {accelerator.num_processes} processes")
    bf16 = (cfg.model.dtype in ("auto", "bf16")) and bf16_supported(accelerator.device)
    optimizer = build_optimizer(cfg, model, con)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg, schedule_steps))
    if sharded:
        optimizer = accelerator.prepare(optimizer)  # the model is FSDP's: accelerate must not wrap it in DDP
    else:
        model, optimizer = accelerator.prepare(model, optimizer)

    config_yaml = dump_config(cfg)
    ctx = LoopContext(cfg=cfg, run_dir=run_dir, model=model, tokenizer=tok, accelerator=accelerator, method=method,
                      train_items=train_items, valid_items=valid_items, total_steps=total_steps,
                      steps_per_epoch=steps_per_epoch, optimizer=optimizer, scheduler=scheduler,
                      weights_name=weights_name(cfg.uses_adapter), config_yaml=config_yaml,
                      console=con, bf16=bf16, on_checkpoint=on_checkpoint, sharded=sharded,
                      hooks=finetune_hooks(cfg))
    rd = RunDir(run_dir)
    found = ckpt.list_checkpoints(run_dir) if resume else []
    if not found and is_main:
        rd.config_path.write_text(config_yaml)
        write_manifest(run_dir, cfg, config_yaml)
        tok.save_pretrained(rd.tokenizer_dir)
        rd.metrics_path.unlink(missing_ok=True)
    ctx.tracker = Tracker(run_dir, list(cfg.track), cfg.model_dump(mode="json"), cfg.mlflow_uri, enabled=is_main)
    resumed_from: dict[str, Any] | None = None
    # setup() first: a method may add modules and optimizer groups (reward/value heads) that the saved state has.
    method.setup(ctx)
    if found:
        state, opt_sd, sch_sd, rng = ckpt.load_checkpoint(found[-1])
        if sharded or fsdp.saved_by_name(opt_sd):
            # Full state from a sharded run (or for one): loads into shards or a whole model alike.
            fsdp.load_full_state(ctx.unwrap(), optimizer, ckpt.read_full_weights(found[-1] / ctx.weights_name), opt_sd)
        else:
            ckpt.load_weights_into(ctx.unwrap(), found[-1] / ctx.weights_name)
            optimizer.load_state_dict(opt_sd)
        method.load_extra_state(ckpt.load_extra(found[-1]))
        scheduler.load_state_dict(sch_sd)
        ckpt.set_rng_state(rng)
        ctx.state = LoopState.from_dict(state)
        st = ctx.state
        resumed_from = {"checkpoint": str(found[-1]), "step": st.step, "epoch": st.epoch,
                        "step_in_epoch": st.step_in_epoch, "tokens_seen": st.tokens_seen}
        if is_main:
            # Rows a killed run logged after this checkpoint are logged again from here: drop them first.
            rd.drop_metrics_after(st.step)
            ctx.tracker.log(ResumeEvent(st.step, resumed_from))
        if con is not None:
            con.print(f"resuming from {found[-1]} (step {st.step}/{total_steps}, epoch {st.epoch}, "
                      f"step {st.step_in_epoch} of {steps_per_epoch} in it, {st.tokens_seen} tokens seen)")
    try:
        with _progress(con, show_progress) as progress:
            run_loop(ctx, progress)
    except NonFiniteLoss as e:
        last = ckpt.list_checkpoints(run_dir)
        where = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint had been written yet"
        raise TunelabError(f"{e.message}; training stopped and nothing after it was saved; {where}. "
                           "Lower train.lr or enable train.max_grad_norm.", 3) from None
    finally:
        ctx.tracker.close()
    result = _finish(ctx)
    result.resumed_from = resumed_from
    return result


def _finish(ctx: LoopContext) -> RunResult:
    st, run_dir = ctx.state, ctx.run_dir
    ctx.accelerator.wait_for_everyone()
    weights = ctx.gathered_weights()  # collective: every process, whichever weights rank 0 ends up writing
    if ctx.is_main:
        rd = RunDir(run_dir)
        out, best = rd.output_dir(ctx.weights_name), rd.best_dir(ctx.weights_name)
        if out.exists():
            shutil.rmtree(out)
        if st.stopped_early and best.exists():
            shutil.copytree(best, out)  # the run's result is the best checkpoint, not the last step
        else:
            ckpt.save_weights(ctx.unwrap(), out, state_dict=weights)
        if ctx.weights_name == "model":
            ctx.tokenizer.save_pretrained(out)
        rd.state_path.write_text(json.dumps(asdict(st), indent=1))
        plot_loss(run_dir, st.best_step)
    ctx.accelerator.wait_for_everyone()
    return RunResult(run_dir, st, ctx.last_valid)


class _NoProgress:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *a: Any) -> None:
        return None


def _progress(console: Any, show: bool) -> Any:
    if console is None or not show:
        return _NoProgress()
    return _ProgressWithDefaults(console)


class _ProgressWithDefaults:
    """A rich Progress whose task starts with loss/lr/tok-s fields so the columns render before step 1."""

    def __init__(self, console: Any) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.p = Progress(
            TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("lr {task.fields[lr]:.2e}"),
            TextColumn("{task.fields[tps]:.0f} tok/s"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, refresh_per_second=4,
        )

    def __enter__(self) -> _ProgressWithDefaults:
        self.p.__enter__()
        return self

    def __exit__(self, *a: Any) -> None:
        self.p.__exit__(*a)

    def add_task(self, name: str, total: int, completed: int) -> Any:
        return self.p.add_task(name, total=total, completed=completed, loss=math.nan, lr=0.0, tps=0.0)

    def update(self, task: Any, **kw: Any) -> None:
        self.p.update(task, **kw)
