"""Commands: `tunelab serve-jobs` (the OpenAI-compatible server plus the Files and Fine-tuning Jobs APIs) and
`tunelab jobs ...` (a client built on the official `openai` package, so the same commands work against a
tunelab server or OpenAI's hosted service: `--base-url`, key from OPENAI_API_KEY).

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
from tunelab.model.loading import DEFAULT_MODEL

jobs_app = typer.Typer(no_args_is_help=True, help="Fine-tuning jobs through the OpenAI API (tunelab or OpenAI).")


def serve_jobs_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Base model to serve and fine-tune."),
    data_dir: Path = typer.Option(Path("tunelab-data"), "--data-dir", help="Where files, jobs and models live."),
    workers: int = typer.Option(1, "--workers", min=1, help="Jobs trained at the same time (one child process each)."),
    database_url: str | None = typer.Option(None, "--database-url",
                                            help="SQLAlchemy URL (default: SQLite in --data-dir)."),
    max_upload_bytes: int = typer.Option(512 * 1024 * 1024, help="Largest uploaded file."),
    max_jobs_per_owner: int = typer.Option(4, min=1, help="Jobs one owner may have validating, queued or running."),
    max_files_per_owner: int = typer.Option(100, min=1, help="Files one owner may store."),
    max_bytes_per_owner: int = typer.Option(10 * 1024**3, min=1, help="Bytes of files one owner may store."),
    set_: list[str] = typer.Option([], "--set", help="Override every job's config: key=value (e.g. train.max_steps=50)."),
    adapter: list[str] = typer.Option([], "--adapter", help="Also serve an adapter: NAME=PATH (repeatable)."),
    max_loaded_adapters: int = typer.Option(8, help="Adapters kept in memory; least recently used leave first."),
    api_key: list[str] = typer.Option([], "--api-key", help="Accept this bearer key (repeatable)."),
    api_keys_file: Path | None = typer.Option(None, "--api-keys-file",
                                              help="File of keys: 'KEY [OWNER [admin]]' per line."),
    admin_key: list[str] = typer.Option([], "--admin-key", help="Also accept this key, as an admin (/health details)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on (0 picks a free one)."),
    shutdown_timeout: int = typer.Option(30, help="Seconds in-flight requests get to finish after SIGTERM."),
    dtype: str = typer.Option("auto", help="auto, bf16, fp16 or fp32 (serving)."),
    device: str | None = typer.Option(None, help="Serving device: cpu, cuda, cuda:1 ..."),
    served_model_name: str | None = typer.Option(None, help="Name clients use for the base (default: --model)."),
    max_request_bytes: int = typer.Option(1_000_000, help="Largest request body other than a file upload."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Serve the base model and its adapters, plus OpenAI's Files and Fine-tuning Jobs APIs."""
    from tunelab.config import parse_overrides
    from tunelab.engine.cli import parse_adapter_option
    from tunelab.engine.engine import Engine
    from tunelab.jobs.app import build_jobs_app
    from tunelab.jobs.service import JobsSettings
    from tunelab.server import ServerSettings, load_admin_keys, load_api_keys
    from tunelab.server.run import serve

    sets = parse_overrides(set_)
    keys = load_api_keys(api_key, api_keys_file, admin_key)
    # Uploads bypass the server's in-memory body guard and stream to disk (multipart overhead on top of the file).
    admins = load_admin_keys(api_keys_file, admin_key)
    settings = ServerSettings(api_keys=keys, admin_keys=admins, max_request_bytes=max_request_bytes, streamed_paths=("/v1/files",),
                              max_streamed_bytes=max_upload_bytes + 65536)
    typer.echo(f"loading {model} ...")
    engine = Engine.from_pretrained(model, dtype=dtype, device=device, served_model_name=served_model_name,
                                    adapters=dict(parse_adapter_option(a) for a in adapter),
                                    max_loaded_adapters=max_loaded_adapters)
    names = tuple(dict.fromkeys([engine.base_model_name, model]))
    jobs_settings = JobsSettings(data_dir=data_dir.resolve(), base_model=model, served_names=names,
                                 max_upload_bytes=max_upload_bytes, max_jobs_per_owner=max_jobs_per_owner,
                                 max_files_per_owner=max_files_per_owner, max_bytes_per_owner=max_bytes_per_owner,
                                 server_sets=sets)
    app = build_jobs_app(engine, settings, jobs_settings, workers=workers, database=database_url)

    def announce(url: str) -> None:
        typer.echo(f"serving on {url}")
        typer.echo(f"fine-tuning {names[0]} with {workers} worker(s); data in {jobs_settings.data_dir}")
        typer.echo(f"try: tunelab jobs --base-url {url} list")

    try:
        serve(app, host, port, shutdown_timeout=shutdown_timeout, log_level=log_level, on_listening=announce)
    finally:
        engine.close()
    typer.echo("server stopped")


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
    app.command("serve-jobs")(serve_jobs_command)
    app.add_typer(jobs_app, name="jobs")
