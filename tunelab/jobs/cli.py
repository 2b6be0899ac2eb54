"""Commands: `tunelab jobs ...`, a client built on the official `openai` package, so the same commands work
against a tunelab server (`tunelab serve`, whose Files and Fine-tuning Jobs APIs are on by default) or OpenAI's
hosted service: `--base-url`, key from OPENAI_API_KEY.

Thin: parse options, call the library (or the openai client), print.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

import typer

from tunelab.errors import ConfigError, TunelabError

jobs_app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs through the OpenAI API (tunelab or OpenAI).")


# ---------------------------------------------------------------------------------------------- client
def _client(base_url: str | None) -> Any:
    from openai import OpenAI

    url = base_url or os.environ.get("OPENAI_BASE_URL") or "http://127.0.0.1:8000/v1"
    return OpenAI(base_url=url, api_key=os.environ.get("OPENAI_API_KEY") or "none", max_retries=1)


def _call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    import openai

    try:
        return fn(*args, **kwargs)
    except openai.APIStatusError as e:
        body = e.body if isinstance(e.body, dict) else {}
        err = body.get("error", body) if isinstance(body, dict) else {}
        msg = err.get("message") if isinstance(err, dict) else None
        raise TunelabError(f"server answered {e.status_code}: {msg or e.message}", 1) from None
    except openai.APIConnectionError as e:
        raise TunelabError(f"cannot reach the server: {e}", 1) from None


def _show(obj: Any) -> None:
    typer.echo(json.dumps(obj.model_dump(exclude_none=True) if hasattr(obj, "model_dump") else obj, indent=1))


BaseUrl = typer.Option(None, "--base-url", help="API base URL (default $OPENAI_BASE_URL or http://127.0.0.1:8000/v1).")


@jobs_app.command("upload")
def upload(path: Path = typer.Argument(..., help="JSONL file."), purpose: str = "fine-tune",
           base_url: str | None = BaseUrl) -> None:
    """Upload a file; prints its id."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such file")
    with path.open("rb") as f:
        obj = _call(_client(base_url).files.create, file=f, purpose=purpose)
    typer.echo(obj.id)


@jobs_app.command("create")
def create(
    training_file: str = typer.Argument(..., help="File id (file-...) or a local JSONL path to upload first."),
    model: str = typer.Option(..., "--model", "-m", help="Base model to fine-tune."),
    validation_file: str | None = typer.Option(None, help="File id or local JSONL path."),
    n_epochs: str = typer.Option("auto", help="Number or auto."),
    batch_size: str = typer.Option("auto", help="Number or auto."),
    learning_rate_multiplier: str = typer.Option("auto", help="Number or auto."),
    suffix: str | None = typer.Option(None, help="Appears in the fine-tuned model's name."),
    seed: int | None = typer.Option(None),
    method: str = typer.Option("supervised", help="supervised or dpo."),
    beta: str = typer.Option("auto", help="DPO beta (number or auto)."),
    option: list[str] = typer.Option([], "--option", "-o", help="tunelab option key=value (lora_r=8, finetune=qlora ...)."),
    base_url: str | None = BaseUrl,
) -> None:
    """Create a fine-tuning job; prints it."""
    from tunelab.config import parse_overrides

    client = _client(base_url)

    def file_id(v: str) -> str:
        if v.startswith("file-") and not Path(v).exists():
            return v
        with Path(v).open("rb") as f:
            return str(_call(client.files.create, file=f, purpose="fine-tune").id)

    def num(v: str) -> Any:
        if v == "auto":
            return v
        try:
            return int(v) if v.isdigit() else float(v)
        except ValueError:
            raise ConfigError(f"expected a number or 'auto', got {v!r}") from None

    hp: dict[str, Any] = {"n_epochs": num(n_epochs), "batch_size": num(batch_size),
                          "learning_rate_multiplier": num(learning_rate_multiplier)}
    if method == "dpo":
        hp["beta"] = num(beta)
    kwargs: dict[str, Any] = {"model": model, "training_file": file_id(training_file),
                              "method": {"type": method, method: {"hyperparameters": hp}}}
    if validation_file:
        kwargs["validation_file"] = file_id(validation_file)
    if suffix:
        kwargs["suffix"] = suffix
    if seed is not None:
        kwargs["seed"] = seed
    if option:
        kwargs["extra_body"] = {"tunelab": dict(parse_overrides(option))}
    _show(_call(client.fine_tuning.jobs.create, **kwargs))


@jobs_app.command("list")
def list_jobs(limit: int = 20, base_url: str | None = BaseUrl) -> None:
    """List your jobs, newest first."""
    page = _call(_client(base_url).fine_tuning.jobs.list, limit=limit)
    for j in page.data:
        typer.echo(f"{j.id}  {j.status:<16} {j.model}  {j.fine_tuned_model or ''}")


@jobs_app.command("get")
def get(job_id: str, base_url: str | None = BaseUrl) -> None:
    """Show a job."""
    _show(_call(_client(base_url).fine_tuning.jobs.retrieve, job_id))


@jobs_app.command("events")
def events(job_id: str, follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing until the job ends."),
           limit: int = 50, interval: float = 2.0, base_url: str | None = BaseUrl) -> None:
    """Print a job's events, oldest first; --follow waits for new ones until the job finishes."""
    client = _client(base_url)
    seen: set[str] = set()
    while True:
        page = _call(client.fine_tuning.jobs.list_events, job_id, limit=limit if not seen else 100)
        for ev in reversed(page.data):
            if ev.id not in seen:
                seen.add(ev.id)
                stamp = time.strftime("%H:%M:%S", time.localtime(ev.created_at))
                typer.echo(f"{stamp} {ev.level:<5} {ev.message}")
        if not follow:
            return
        job = _call(client.fine_tuning.jobs.retrieve, job_id)
        if job.status in ("succeeded", "failed", "cancelled"):
            if job.status == "failed" and job.error:
                typer.echo(f"failed: {job.error.message}")
            return
        time.sleep(interval)


@jobs_app.command("cancel")
def cancel(job_id: str, base_url: str | None = BaseUrl) -> None:
    """Cancel a job (a running one stops at once)."""
    typer.echo(_call(_client(base_url).fine_tuning.jobs.cancel, job_id).status)


@jobs_app.command("pause")
def pause(job_id: str, base_url: str | None = BaseUrl) -> None:
    """Pause a job at its next checkpoint."""
    typer.echo(_call(_client(base_url).fine_tuning.jobs.pause, job_id).status)


@jobs_app.command("resume")
def resume(job_id: str, base_url: str | None = BaseUrl) -> None:
    """Resume a paused job from its last checkpoint."""
    typer.echo(_call(_client(base_url).fine_tuning.jobs.resume, job_id).status)


@jobs_app.command("checkpoints")
def list_checkpoints(job_id: str, base_url: str | None = BaseUrl) -> None:
    """List a job's checkpoints (each is a servable model name)."""
    page = _call(_client(base_url).fine_tuning.jobs.checkpoints.list, job_id)
    for c in page.data:
        m = c.metrics
        typer.echo(f"step {c.step_number:>6}  train_loss={m.train_loss}  valid_loss={m.valid_loss}  "
                   f"{c.fine_tuned_model_checkpoint}")


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    app.add_typer(jobs_app, name="jobs")
