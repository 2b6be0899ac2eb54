"""Preference-training commands (`tunelab reward score`) and the registration of the preference and RL
methods with `tunelab train` (method name -> module:Class, as in tunelab.train.run.METHODS).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer


def reward_score(
    run: Annotated[Path, typer.Argument(help="a run folder trained with `method: reward`")],
    data: Annotated[Path | None, typer.Option(help="JSONL: preference pairs (scores both sides) or conversations")] = None,
    prompt: Annotated[str | None, typer.Option(help="a single user prompt to score with --response")] = None,
    response: Annotated[str | None, typer.Option(help="the assistant response to score")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print all scores as JSON")] = False,
) -> None:
    """Score (prompt, response) pairs with a trained reward model."""
    from rich.console import Console

    from tunelab.errors import TunelabError

    console = Console(highlight=False)
    if (data is None) == (prompt is None):
        raise TunelabError("give either --data FILE or --prompt TEXT --response TEXT", 2)
    if data is not None:
        from tunelab.train.reward import score_file

        out = score_file(run, data)
    else:
        if prompt is None or response is None:
            raise TunelabError("--prompt needs --response", 2)
        from tunelab.data.records import Message
        from tunelab.train.reward import RewardModel

        s = RewardModel.load(run).score([(Message("user", prompt),)], [response])[0]
        out = {"rows": [{"score": s}], "mean": s}
    if as_json:
        console.print_json(json.dumps(out))
        return
    for i, row in enumerate(out["rows"], start=1):
        console.print(f"{i:>4}  " + "  ".join(f"{k} {v:+.4f}" for k, v in row.items()))
    console.print(f"mean {out['mean']:+.4f}" + (f"  accuracy {out['accuracy']:.3f}" if "accuracy" in out else ""))


def register(app: Any, data_app: Any) -> None:
    reward_app = typer.Typer(no_args_is_help=True, help="Reward models: score responses.")
    reward_app.command("score")(reward_score)
    app.add_typer(reward_app, name="reward")
