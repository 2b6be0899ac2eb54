"""`tunelab plan memory|cost|advise`: parse flags, call tunelab.plan, print. No logic lives here."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from tunelab.errors import TunelabError

console = Console(highlight=False)
plan_app = typer.Typer(no_args_is_help=True, help="Decide before training: advice, memory, cost.")


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB"


def memory_cmd(
    model: Annotated[str, typer.Argument(help="built-in name, local folder, hub id (config only) or a preset: "
                                              "llama-2-7b, llama-3.1-8b, mistral-7b, qwen2.5-7b, llama-65b")],
    method: Annotated[str, typer.Option(help="full | lora | qlora | dora")] = "lora",
    seq_len: Annotated[int, typer.Option(help="tokens per example")] = 1024,
    batch: Annotated[int, typer.Option(help="examples per micro-batch per process")] = 1,
    grad_ckpt: Annotated[bool, typer.Option("--grad-ckpt", help="gradient checkpointing")] = False,
    optimizer: Annotated[str, typer.Option(help="adamw | adamw8bit | paged_adamw")] = "adamw",
    dtype: Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32 (as model.dtype; auto keeps fp32 masters "
                                            "for full fine-tuning)")] = "auto",
    packing: Annotated[bool, typer.Option(help="padding-free packing (no attention mask)")] = True,
    processes: Annotated[int, typer.Option(help="processes (GPUs) in the run")] = 1,
    fsdp: Annotated[bool, typer.Option("--fsdp", help="shard weights, gradients and optimizer state (full)")] = False,
    grad_accum: Annotated[int, typer.Option(help="micro-batches per optimizer step")] = 1,
    lora_r: Annotated[int, typer.Option(help="LoRA rank")] = 16,
    lora_targets: Annotated[str, typer.Option(help="all-linear or names, e.g. q_proj,v_proj")] = "all-linear",
    lora_dropout: Annotated[float, typer.Option()] = 0.05,
    loss_chunk: Annotated[int, typer.Option(help="train.loss_chunk (0: whole logits at once)")] = 256,
    attention: Annotated[str, typer.Option(help="sdpa | eager")] = "sdpa",
    trained_fraction: Annotated[float, typer.Option(help="fraction of tokens with a loss")] = 1.0,
    device: Annotated[str, typer.Option(help="cuda | cpu | auto (this machine's)")] = "auto",
    budget: Annotated[str | None, typer.Option(help="memory to fit in, e.g. 24GB or 80GiB")] = None,
    measure: Annotated[bool, typer.Option("--measure", help="run 3 real steps here and add measured_bytes")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Peak training memory: weights, gradients, optimizer state, activations, logits, adapters, overhead."""
    from dataclasses import replace

    from tunelab.plan.arch import load_arch
    from tunelab.plan.memory import Shape, estimate, largest_batch, largest_seq_len, parse_bytes

    choices = {"method": (method, ("full", "lora", "qlora", "dora")),
               "optimizer": (optimizer, ("adamw", "adamw8bit", "paged_adamw")),
               "dtype": (dtype, ("auto", "bf16", "fp16", "fp32")), "attention": (attention, ("sdpa", "eager")),
               "device": (device, ("auto", "cuda", "cpu"))}
    for flag, (val, ok) in choices.items():
        if val not in ok:
            raise TunelabError(f"--{flag} {val!r}: expected one of {', '.join(ok)}", 2)
    import torch

    from tunelab.model.loading import bf16_supported

    dev = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    targets = None if lora_targets == "all-linear" else tuple(t.strip() for t in lora_targets.split(",") if t.strip())
    shape = Shape(method=method, seq_len=seq_len, batch=batch, grad_ckpt=grad_ckpt, optimizer=optimizer,  # type: ignore[arg-type]
                  dtype=dtype, packing=packing, processes=processes, fsdp=fsdp, grad_accum=grad_accum,  # type: ignore[arg-type]
                  lora_r=lora_r, lora_targets=targets, lora_dropout=lora_dropout, loss_chunk=loss_chunk, attention=attention,  # type: ignore[arg-type]
                  trained_fraction=trained_fraction, device=dev,  # type: ignore[arg-type]
                  bf16_ok=True if dev == "cuda" and not torch.cuda.is_available() else bf16_supported(torch.device(dev)))
    arch = load_arch(model)
    est = estimate(arch, shape)
    out = est.to_json()
    if budget is not None:
        b = parse_bytes(budget)
        out["budget"] = {"bytes": b, "fits": est.total_bytes <= b,
                         "largest_batch_at_seq_len": largest_batch(arch, shape, b),
                         "largest_seq_len_at_batch": largest_seq_len(arch, shape, b),
                         "largest_batch_at_seq_len_with_grad_ckpt": largest_batch(arch, replace(shape, grad_ckpt=True), b)}
    if measure:
        from tunelab.plan.measure import measure as run_measure

        m = run_measure(model, shape)
        out["measure"] = m
        out["measured_bytes"] = m["measured_bytes"]
        ref = est.total_bytes - est.overhead_bytes
        out["error_pct"] = round(100 * (ref - m["measured_bytes"]) / m["measured_bytes"], 1)
    if as_json:
        typer.echo(json.dumps(out, indent=1))
        return
    _print_memory(out, est)


def _print_memory(out: dict[str, Any], est: Any) -> None:
    s = est.shape
    console.print(f"[bold]{est.model}[/bold] · {s.method} · seq {s.seq_len} x batch {s.batch}"
                  f"{' · grad ckpt' if s.grad_ckpt else ''} · {s.optimizer} · dtype {s.dtype} · {s.device}"
                  f"{f' · {s.processes} processes' if s.processes > 1 else ''}{' · fsdp' if s.fsdp else ''}")
    console.print(f"params {est.params:,} · trainable {est.trainable_params:,}")
    t = Table(show_header=True, header_style="bold")
    t.add_column("part")
    t.add_column("GB", justify="right")
    t.add_column("GiB", justify="right")
    for name, v in est.parts().items():
        t.add_row(name, f"{v / 1e9:,.2f}", f"{v / 2**30:,.2f}")
    t.add_row(f"[bold]peak ({est.peak_at})[/bold]", f"[bold]{est.total_bytes / 1e9:,.2f}[/bold]",
              f"[bold]{est.total_bytes / 2**30:,.2f}[/bold]")
    console.print(t)
    console.print("[dim]the peak holds the parts alive at that moment: the activations and logits at the start "
                  "of the backward pass, or the gradients at the optimizer step[/dim]")
    for n in est.notes:
        console.print(f"[dim]note: {n}[/dim]")
    if "budget" in out:
        b = out["budget"]
        verdict = "[green]fits[/green]" if b["fits"] else "[red]does not fit[/red]"
        console.print(f"budget {_gb(b['bytes'])}: {verdict}; largest micro-batch at seq {s.seq_len}: "
                      f"{b['largest_batch_at_seq_len']} ({b['largest_batch_at_seq_len_with_grad_ckpt']} with "
                      f"gradient checkpointing); largest seq len at batch {s.batch}: {b['largest_seq_len_at_batch']}")
    if "measured_bytes" in out:
        m = out["measure"]
        console.print(f"measured ({m['steps']} steps, {m['how']}): {_gb(out['measured_bytes'])}; "
                      f"estimate {out['error_pct']:+.1f}%")


def cost_cmd(
    calls_per_month: Annotated[float, typer.Option(help="calls a month")],
    prompt_tokens_removed: Annotated[float, typer.Option(help="prompt tokens a call no longer needs")] = 0,
    prompt_tokens: Annotated[float, typer.Option(help="input tokens per call today (default: the removed ones)")] = 0,
    output_tokens: Annotated[float, typer.Option(help="output tokens per call")] = 0,
    input_price: Annotated[float, typer.Option(help="$ per 1M input tokens, model used today")] = 0.0,
    output_price: Annotated[float, typer.Option(help="$ per 1M output tokens, model used today")] = 0.0,
    new_input_price: Annotated[float | None, typer.Option(help="$ per 1M input tokens after switching model")] = None,
    new_output_price: Annotated[float | None, typer.Option(help="$ per 1M output tokens after switching")] = None,
    hosting_per_month: Annotated[float, typer.Option(help="$ a month to serve the fine-tuned model yourself")] = 0.0,
    train_tokens: Annotated[float, typer.Option(help="training tokens per epoch")] = 0,
    epochs: Annotated[float, typer.Option()] = 1.0,
    tokens_per_s: Annotated[float | None, typer.Option(help="measured training throughput (tok/s)")] = None,
    gpu_hour_price: Annotated[float, typer.Option(help="$ per GPU-hour")] = 0.0,
    gpus: Annotated[int, typer.Option(help="GPUs training at once")] = 1,
    train_price: Annotated[float | None, typer.Option(help="$ per 1M training tokens (hosted fine-tuning)")] = None,
    extra_cost: Annotated[float, typer.Option(help="one-off $ besides compute (data, evaluation)")] = 0.0,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Training cost against per-call savings: monthly saving and the break-even month."""
    from tunelab.plan.cost import CostInputs, compute

    r = compute(CostInputs(
        calls_per_month=calls_per_month, prompt_tokens_removed=prompt_tokens_removed, prompt_tokens=prompt_tokens,
        output_tokens=output_tokens, input_price=input_price, output_price=output_price,
        new_input_price=new_input_price, new_output_price=new_output_price, hosting_per_month=hosting_per_month,
        train_tokens=train_tokens, epochs=epochs, tokens_per_s=tokens_per_s, gpu_hour_price=gpu_hour_price,
        gpus=gpus, train_price=train_price, extra_cost=extra_cost))
    if as_json:
        typer.echo(json.dumps(r, indent=1))
        return
    console.print(f"input tokens saved a month: {r['input_tokens_saved_per_month']:,.0f}")
    console.print(f"monthly cost: ${r['monthly_cost_before']:,.2f} today -> ${r['monthly_cost_after']:,.2f} "
                  f"fine-tuned; saving ${r['monthly_saving']:,.2f} a month")
    hours = f", {r['gpu_hours']:,.2f} GPU-hours" if r["gpu_hours"] else ""
    console.print(f"one-off: training ${r['training_cost']:,.2f} ({r['training_tokens']:,.0f} tokens"
                  f"{hours}) + other "
                  f"${r['one_off_cost'] - r['training_cost']:,.2f}")
    if r["break_even_month"] is None:
        console.print("[yellow]no break-even: fine-tuning does not save money at this volume[/yellow]")
    else:
        console.print(f"break-even in month {r['break_even_month']} ({r['break_even_months']:.2f} months); "
                      f"first-year net ${r['first_year_net']:,.2f}")


def advise_cmd(
    config: Annotated[Path, typer.Argument(help="run config YAML (model, system prompt, eval metrics)")],
    data: Annotated[Path, typer.Option(help="held-out eval JSONL (questions with reference answers)")],
    train: Annotated[Path | None, typer.Option(help="training JSONL (default: the config's data.train)")] = None,
    system_prompt: Annotated[str | None, typer.Option(help="instructions for the prompting option")] = None,
    answers: Annotated[Path | None, typer.Option(help="YAML: data_changes, calls_per_month, target")] = None,
    interactive: Annotated[bool, typer.Option("--interactive", help="ask the questions that cannot be measured")] = False,
    k: Annotated[int, typer.Option(help="retrieved examples per question")] = 3,
    probe_steps: Annotated[int, typer.Option(help="LoRA probe steps (0: skip the probe)")] = 30,
    max_examples: Annotated[int | None, typer.Option(help="evaluate the first N examples")] = None,
    max_new_tokens: Annotated[int | None, typer.Option(help="override eval.generation.max_new_tokens")] = None,
    metric: Annotated[str | None, typer.Option(help="the deciding metric (default: json_valid for JSON answers, "
                                                     "else contains_answer)")] = None,
    out: Annotated[Path | None, typer.Option(help="folder for plan/advice.json and report.html "
                                                  "(default: the config's output_dir)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the advice as JSON")] = False,
) -> None:
    """Measure prompting, retrieval (BM25 few-shot) and a short LoRA probe on your eval set, and recommend."""
    from tunelab.config import load_config
    from tunelab.eval.report import write_report
    from tunelab.eval.run import write_json
    from tunelab.plan.advise import Answers, advise, ask_answers, read_answers
    from tunelab.plan.report import ADVICE

    if k < 1 or probe_steps < 0:
        raise TunelabError("--k must be >= 1 and --probe-steps >= 0", 2)
    ans = read_answers(answers) if answers else Answers()
    if interactive:
        ans = ask_answers(lambda q, d: typer.prompt(q, default=d))
    folder = out or Path(load_config(config).output_dir)
    log = (lambda m: None) if as_json else (lambda m: console.print(f"[dim]{m}[/dim]"))
    adv = advise(config, data, train=train, system_prompt=system_prompt, answers=ans, k=k, probe_steps=probe_steps,
                 max_examples=max_examples, max_new_tokens=max_new_tokens, metric=metric,
                 workdir=folder / "plan", log=log)
    write_json(folder / ADVICE, adv)
    report = write_report(folder)
    if as_json:
        typer.echo(json.dumps(adv, indent=1))
        return
    _print_advice(adv)
    console.print(f"advice: {folder / ADVICE} · report: {report}")


def _print_advice(adv: dict[str, Any]) -> None:
    m = adv["metric"]
    t = Table(title=f"{adv['model']} on {adv['data']} ({adv['n_examples']} examples)", header_style="bold")
    for col in ("option", m, "prompt tokens/call", "latency s/call", "training s"):
        t.add_column(col, justify="left" if col == "option" else "right")
    for name, o in adv["options"].items():
        t.add_row(name, f"{o[m]:.1%}", f"{o['prompt_tokens']:.0f}", f"{o['latency_s']:.2f}", f"{o['training_s']:.0f}")
    cd = adv["constrained_decoding"]
    t.add_row("constrained decoding", f"{cd['schema_valid']:.0%} valid" if cd["available"] else "unavailable",
              "", f"{cd['latency_s']:.2f}" if cd["available"] else "", "0" if cd["available"] else "")
    console.print(t)
    console.print(f"[dim]constrained decoding: {adv['constrained_decoding']['reason']}[/dim]")
    rec = adv["recommendation"]
    console.print(f"[bold]recommendation: {rec['choice']}[/bold]")
    for r in rec["reasons"]:
        console.print(f"  - {r}")


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    app.add_typer(plan_app, name="plan")
    plan_app.command("memory")(memory_cmd)
    plan_app.command("cost")(cost_cmd)
    plan_app.command("advise")(advise_cmd)



