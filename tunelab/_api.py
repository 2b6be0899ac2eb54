"""The functions of the public Python API (`tunelab.train`, `tunelab.evaluate`, `tunelab.serve`): the CLI's
commands as calls, for notebooks and scripts. Each is thin over the library code the CLI uses too; heavy
imports (torch, transformers) happen inside the call. See docs/python.md.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI

    from tunelab.config import RunConfig
    from tunelab.rundir import RunDir


def _console(quiet: bool) -> Any:
    from rich.console import Console

    return None if quiet else Console(highlight=False)


def train(config: RunConfig | str | Path, *, resume: bool = False, overwrite: bool = False,
          quiet: bool = False) -> RunDir:
    """Fine-tune as `tunelab train` does and return the finished run folder.

    `config` is a `RunConfig` (from `tunelab.load_config`) or the path of a config YAML. `resume` continues the
    run in `config.output_dir` from its last checkpoint; `overwrite` replaces a finished or unrelated run
    there (otherwise an existing run folder is an error). `quiet` prints nothing (no progress bar)."""
    from tunelab.config import RunConfig, load_config
    from tunelab.rundir import RunDir
    from tunelab.train.run import train as run_training

    cfg = config if isinstance(config, RunConfig) else load_config(config)
    res = run_training(cfg, resume=resume, overwrite=overwrite, console=_console(quiet), show_progress=not quiet)
    return RunDir(res.run_dir)


def evaluate(target: RunDir | str | Path, *, data: str | Path | None = None, runs: Sequence[RunDir | str | Path] = (),
             system_prompt: str | None = None, eval_config: str | Path | None = None,
             max_examples: int | None = None, forgetting: bool | None = None, out: str | Path | None = None,
             quiet: bool = False) -> dict[str, Any]:
    """Score the base model and fine-tuned runs on the same held-out examples, as `tunelab eval` does; write
    the results JSON (RUN/eval/results.json unless `out`) and return the results.

    `target` is a run folder (scored with its base model) or a run config YAML (its base model alone; add runs
    to compare with `runs`). `data` defaults to the config's `data.test`; `eval_config` is a YAML with `eval:`
    settings; `max_examples` and `forgetting` override those settings."""
    from tunelab.eval.run import evaluate as run_eval
    from tunelab.eval.run import plan, write_json

    def path(x: RunDir | str | Path) -> Path:
        return Path(x) if isinstance(x, str | Path) else x.path

    p = plan(path(target), data=data, runs=[path(r) for r in runs], system_prompt=system_prompt,
             eval_config=eval_config, out=out)
    updates = {k: v for k, v in {"max_examples": max_examples, "forgetting": forgetting}.items() if v is not None}
    if updates:
        p.eval_config = p.eval_config.model_copy(update=updates)
    con = _console(quiet)
    res = run_eval(p, log=(lambda s: None) if con is None else (lambda s: con.print(s, style="dim", markup=False)))
    for dest in p.outputs:
        write_json(dest, res)
    return res


def serve(model: str = "smollm2-135m-instruct", *, adapters: Mapping[str, str | Path] | None = None,
          adapters_dir: str | Path | None = None, api_keys: Sequence[str] = (), dtype: str = "auto",
          device: str | None = None, served_model_name: str | None = None, max_loaded_adapters: int = 8,
          max_batch_size: int = 32, max_tokens_limit: int = 4096) -> FastAPI:
    """Load `model` (a built-in name, hub id, folder or .gguf) and its adapters (name -> run or adapter folder)
    into the generation engine and return the OpenAI-compatible ASGI app serving them, for uvicorn:
    `uvicorn.run(tunelab.serve(...), port=8000)`. The request's `model` field picks the base or an adapter;
    with `api_keys` every request needs `Authorization: Bearer KEY`. The engine stops when the app shuts down."""
    from tunelab.engine.engine import Engine
    from tunelab.server import ServerSettings, create_app, load_api_keys

    engine = Engine.from_pretrained(model, dtype=dtype, device=device, adapters=adapters, adapters_dir=adapters_dir,
                                    served_model_name=served_model_name, max_loaded_adapters=max_loaded_adapters,
                                    max_batch_size=max_batch_size)
    settings = ServerSettings(api_keys=load_api_keys(list(api_keys)), max_tokens_limit=max_tokens_limit)

    async def close() -> None:
        import asyncio

        await asyncio.to_thread(engine.close)  # joins the engine's worker thread: not on the event loop

    return create_app(engine, settings, on_shutdown=close)
