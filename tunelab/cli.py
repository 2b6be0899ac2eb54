"""The `tunelab` command: a map from subcommand to one plain function. No logic lives here.

Command groups owned by other modules register themselves through `COMMAND_MODULES`: each module there has
`register(app, data_app)`.
"""

from __future__ import annotations

import importlib
import os
import sys

import typer

from tunelab.errors import TunelabError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="tunelab: fine-tune open LLMs.")
data_app = typer.Typer(no_args_is_help=True, help="Validate, convert, split and clean training data.")
app.add_typer(data_app, name="data")

COMMAND_MODULES: list[str] = [
    "tunelab.cli_core",
    # helpers add their command modules below this line
    "tunelab.data.toolkit.cli",
    "tunelab.eval.cli",
    "tunelab.engine.cli",
    "tunelab.jobs.cli",
    "tunelab.train.cli_pref",
    "tunelab.registry.cli",
    "tunelab.plan.cli",
    "tunelab.starter",
    "tunelab.export.cli",
]


_registered = False


def _register() -> None:
    # Once per process: `main()` may be called many times in one process (tests, library users), and each
    # registration adds every command again, so the command tree (and the time to build it) would grow per call.
    global _registered
    if _registered:
        return
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(app, data_app)
    _registered = True


def _quiet_libraries() -> None:
    # Library progress bars and advisory warnings drown our own output; our errors say what matters.
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    import logging
    import warnings

    logging.getLogger("transformers").setLevel(logging.ERROR)
    # bitsandbytes says at import that an optional CPU kernel package is missing; it works without it.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)\.")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except Exception:  # pragma: no cover
        pass


def main(argv: list[str] | None = None) -> None:
    _quiet_libraries()
    _register()
    try:
        rc = app(args=argv, standalone_mode=False)  # returns typer.Exit's code in this mode
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except TunelabError as e:
        typer.echo(f"error: {e.message}", err=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        sys.exit(130)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Abort):
            sys.exit(1)
        raise
    sys.exit(0)


if __name__ == "__main__":  # pragma: no cover
    main()
