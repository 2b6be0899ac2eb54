"""`tunelab serve`: load a base model and adapters into an Engine and serve them over the OpenAI API, with
OpenAI's Files and Fine-tuning Jobs APIs on by default (data in the user's data home, `--data-dir` to move
it, `--no-jobs` to serve the model APIs alone).

Lives with the engine (it imports torch through it); the server package stays torch-free. Thin: parse
options, build the engine and the app, print where to connect, run until SIGTERM/SIGINT.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from tunelab.errors import ConfigError
from tunelab.model.loading import DEFAULT_MODEL
from tunelab.rundir import ADAPTER


def default_data_dir() -> Path:
    """The jobs API's data dir: $XDG_DATA_HOME/tunelab, by default ~/.local/share/tunelab (XDG base directories)."""
    import os

    home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(home) / "tunelab"


def parse_adapter_option(value: str) -> tuple[str, Path]:
    """`name=PATH`, or a bare PATH named after its folder (the run folder for RUN/adapter)."""
    if "=" in value:
        name, _, path = value.partition("=")
        if not name or not path:
            raise ConfigError(f"--adapter {value!r}: expected NAME=PATH")
        return name, Path(path)
    p = Path(value)
    name = p.resolve().parent.name if p.name == ADAPTER else p.resolve().name
    return name, p


def serve_command(
    model: str = typer.Option(DEFAULT_MODEL, "--model", "-m", help="Base model: built-in name, hub id, folder or .gguf."),
    adapter: list[str] = typer.Option([], "--adapter", help="Serve an adapter: NAME=PATH (repeatable)."),
    adapters_dir: Path | None = typer.Option(
        None, "--adapters-dir", help="Serve every adapter in this folder (sub-folders, or tunelab runs with adapter/)."
    ),
    max_loaded_adapters: int = typer.Option(8, help="Adapters kept in memory; least recently used leave first."),
    max_batch_size: int = typer.Option(32, help="Most sequences generated in one forward pass."),
    merge: str | None = typer.Option(None, "--merge", help="Fold this adapter into the weights and serve only it."),
    api_key: list[str] = typer.Option([], "--api-key", help="Accept this bearer key (repeatable)."),
    api_keys_file: Path | None = typer.Option(None, "--api-keys-file",
                                              help="File of keys: 'KEY [OWNER [admin]]' per line."),
    admin_key: list[str] = typer.Option([], "--admin-key", help="Also accept this key, as an admin (/health details)."),
    host: str = typer.Option("127.0.0.1", help="Address to listen on."),
    port: int = typer.Option(8000, help="Port to listen on (0 picks a free one)."),
    shutdown_timeout: int = typer.Option(30, help="Seconds in-flight requests get to finish after SIGTERM."),
    dtype: str = typer.Option("auto", help="auto, bf16, fp16 or fp32."),
    load_in_4bit: bool = typer.Option(False, "--load-in-4bit", help="Load the base in 4-bit NF4 (bitsandbytes)."),
    device: str | None = typer.Option(None, help="cpu, cuda, cuda:1 ... (default: cuda if available)."),
    served_model_name: str | None = typer.Option(None, help="Name clients use for the base (default: --model)."),
    max_tokens_limit: int = typer.Option(4096, help="Largest max_tokens a request may ask for."),
    max_n: int = typer.Option(8, help="Largest n a request may ask for."),
    max_request_bytes: int = typer.Option(1_000_000, help="Largest request body in bytes."),
    mixed_batching: bool = typer.Option(True, help="Batch requests for different adapters together."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
    data_dir: Path | None = typer.Option(
        None, "--data-dir", help="Where the Files and Fine-tuning Jobs APIs keep files, jobs and models "
        "(default: $XDG_DATA_HOME/tunelab, i.e. ~/.local/share/tunelab)."),
    no_jobs: bool = typer.Option(False, "--no-jobs", help="Serve the model APIs only: no Files or Fine-tuning Jobs."),
    workers: int = typer.Option(1, "--workers", min=1, help="Fine-tuning jobs trained at once (a child process each)."),
    database_url: str | None = typer.Option(None, "--database-url", help="Jobs store: SQLAlchemy URL (default SQLite in the data dir)."),
    registry_spec: str | None = typer.Option(
        None, "--registry", help="Model registry served by name (NAME, NAME@3, NAME@staging): a SQLAlchemy URL or "
        "mlflow:TRACKING_URI (default: the jobs store's database in the data dir)."),
    max_upload_bytes: int = typer.Option(512 * 1024 * 1024, help="Largest uploaded file."),
    set_: list[str] = typer.Option([], "--set", help="Override every job's config: key=value (e.g. train.max_steps=50)."),
    max_jobs_per_owner: int = typer.Option(4, min=1, help="Jobs one owner may have validating, queued or running."),
    max_files_per_owner: int = typer.Option(100, min=1, help="Files one owner may store."),
    max_bytes_per_owner: int = typer.Option(10 * 1024**3, min=1, help="Bytes of files one owner may store."),
    engine_name: str = typer.Option("tunelab", "--engine", help="tunelab (our engine) or vllm (vLLM in a child "
                                    "process: `make vllm`, or --vllm-python)."),
    vllm_python: Path | None = typer.Option(None, "--vllm-python", help="A python with vLLM for --engine vllm "
                                            "(default: $TUNELAB_VLLM_PYTHON, else .venv-vllm)."),
    vllm_arg: list[str] = typer.Option([], "--vllm-arg", help="Pass this argument on to vLLM's server "
                                       "(repeatable), e.g. --vllm-arg=--gpu-memory-utilization=0.5."),
) -> None:
    """Serve the base model and its adapters over an OpenAI-compatible API, plus the Files and Fine-tuning Jobs APIs."""
    from tunelab.config import parse_overrides
    from tunelab.engine.engine import Engine
    from tunelab.engine.vllm_engine import VllmEngine
    from tunelab.server import ServerSettings, create_app, load_admin_keys, load_api_keys
    from tunelab.server.run import serve

    adapters = dict(parse_adapter_option(a) for a in adapter)
    keys = load_api_keys(api_key, api_keys_file, admin_key)
    admins = load_admin_keys(api_keys_file, admin_key)
    sets = parse_overrides(set_)
    jobs_dir = None if no_jobs else (data_dir or default_data_dir()).expanduser().resolve()
    # File uploads bypass the in-memory body guard and stream to disk (multipart overhead on top of the file).
    streamed = ("/v1/files", "/console/api/files") if jobs_dir is not None else ()
    settings = ServerSettings(api_keys=keys, admin_keys=admins, max_tokens_limit=max_tokens_limit, max_n=max_n,
                              max_request_bytes=max_request_bytes, streamed_paths=streamed,
                              max_streamed_bytes=max_upload_bytes + 65536)
    registry = _open_registry(data_dir, registry_spec or database_url, jobs_dir is not None)
    typer.echo(f"loading {model} ...")
    engine: Engine | VllmEngine
    if engine_name == "vllm":
        for flag, value in (("--merge", merge), ("--load-in-4bit", load_in_4bit), ("--device", device)):
            if value:
                raise ConfigError(f"{flag} is for --engine tunelab; vLLM picks its device and serves adapters as LoRAs")
        typer.echo("starting vLLM in a child process (a few minutes on a CPU) ...")
        engine = VllmEngine(model, python=vllm_python, served_model_name=served_model_name, dtype=dtype,
                            adapters=adapters, adapters_dir=adapters_dir, max_loaded_adapters=max_loaded_adapters,
                            max_batch_size=max_batch_size, extra_args=tuple(vllm_arg))
    elif engine_name == "tunelab":
        engine = Engine.from_pretrained(
            model, dtype=dtype, load_in_4bit=load_in_4bit, device=device, adapters=adapters, adapters_dir=adapters_dir,
            merge=merge, served_model_name=served_model_name, max_loaded_adapters=max_loaded_adapters,
            max_batch_size=max_batch_size, mixed_batching=mixed_batching,
        )
    else:
        raise ConfigError(f"--engine {engine_name!r}: expected tunelab or vllm")
    if jobs_dir is None:
        app = create_app(engine, settings, registry=registry)
    else:
        from tunelab.jobs.app import build_jobs_app
        from tunelab.jobs.service import JobsSettings

        served = tuple(dict.fromkeys([engine.base_model_name, model]))
        jobs = JobsSettings(data_dir=jobs_dir, base_model=model, served_names=served,
                            max_upload_bytes=max_upload_bytes, max_jobs_per_owner=max_jobs_per_owner,
                            max_files_per_owner=max_files_per_owner, max_bytes_per_owner=max_bytes_per_owner,
                            server_sets=sets)
        app = build_jobs_app(engine, settings, jobs, workers=workers, database=database_url, registry=registry)

    def announce(url: str) -> None:
        names = [m.id for m in engine.list_models()]
        typer.echo(f"serving on {url}")
        typer.echo(f"web console: {url.removesuffix('/v1')}/")
        if jobs_dir is not None:
            typer.echo(f"files and fine-tuning jobs APIs on: {workers} worker(s), data in {jobs_dir} "
                       "(--no-jobs turns them off)")
        typer.echo(f"models: {', '.join(names)}")
        if registry is not None:
            typer.echo("registry models are served by name too (NAME, NAME@3, NAME@staging): `tunelab registry list`")
        if isinstance(engine, VllmEngine):
            typer.echo(f"engine: vLLM {engine.vllm_version}, log in {engine.log_path}")
        for path, why in engine.rejected.items():
            typer.echo(f"skipped {path}: {why}")
        if adapters_dir is not None and not adapters_dir.exists():
            typer.echo(f"note: {adapters_dir} does not exist yet; adapters that appear there will be served")
        auth = " -H 'Authorization: Bearer $KEY'" if keys else ""
        typer.echo(
            f"try: curl {url}/chat/completions{auth} -H 'Content-Type: application/json' "
            f"-d '{{\"model\": \"{names[-1]}\", \"messages\": [{{\"role\": \"user\", \"content\": \"Hello\"}}]}}'"
        )

    try:
        serve(app, host, port, shutdown_timeout=shutdown_timeout, log_level=log_level, on_listening=announce)
    finally:
        engine.close()
    typer.echo("server stopped")


def _open_registry(data_dir: Path | None, spec: str | None, jobs_on: bool) -> Any:
    """The registry `tunelab registry` writes (same data dir and database). With --no-jobs and neither option
    given it is served only if it already exists: a plain model server creates no database in the home dir."""
    from tunelab.registry import Registry

    root = (data_dir or default_data_dir()).expanduser().resolve()
    if not (jobs_on or data_dir or spec or (root / "jobs.db").is_file()):
        return None
    return Registry.open(root, spec)


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    app.command("serve")(serve_command)
