"""Core subcommands: data validate/convert/split/preview, train, merge, generate, chat, demo.
Each is a thin function: parse arguments, call the library, print."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from tunelab.errors import TunelabError

console = Console(stderr=False, highlight=False)
err_console = Console(stderr=True, highlight=False)


def _tokenizer_for(model: str | None) -> object | None:
    if model in (None, "", "none"):
        return None
    from tunelab.model.loading import load_tokenizer, resolve_model

    return load_tokenizer(resolve_model(model))


def data_validate(
    file: Annotated[Path, typer.Argument(help="JSONL file to check")],
    model: Annotated[str, typer.Option(help="tokenizer for token counts ('none' to skip)")] = "smollm2-135m-instruct",
    max_seq_len: Annotated[int | None, typer.Option(help="warn about examples longer than this")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print the report as JSON")] = False,
) -> None:
    """Check a training file: every problem with its line and field, then a summary. Exit 1 on errors."""
    from tunelab.data.validate import validate_file

    rep = validate_file(file, _tokenizer_for(model), max_seq_len)
    if as_json:
        console.print_json(json.dumps(rep.to_json()))
    else:
        for issue in rep.issues:
            style = "red" if issue.severity == "error" else "yellow"
            console.print(str(issue), style=style, markup=False, soft_wrap=True)
        for line in rep.summary_lines():
            console.print(line, markup=False, soft_wrap=True)
    if rep.errors:
        raise typer.Exit(1)


def data_convert(
    src: Annotated[Path, typer.Argument(help="input file in any supported format")],
    dst: Annotated[Path, typer.Argument(help="output OpenAI messages JSONL")],
) -> None:
    """Write any supported format as OpenAI `messages` JSONL."""
    from tunelab.data.convert import convert_file

    n = convert_file(src, dst)
    console.print(f"wrote {n} examples to {dst}")


def data_split(
    src: Annotated[Path, typer.Argument()],
    out_dir: Annotated[Path, typer.Option("--out", help="folder for train/validation/test.jsonl")] = Path("splits"),
    fractions: Annotated[str, typer.Option(help="train,validation,test fractions")] = "0.9,0.05,0.05",
    seed: int = 42,
) -> None:
    """Seeded train/validation/test split; exact duplicates never land in two splits."""
    from tunelab.data.convert import split_file

    try:
        fr = tuple(float(x) for x in fractions.split(","))
    except ValueError:
        raise TunelabError(f"--fractions {fractions!r}: expected numbers like 0.9,0.05,0.05", 2) from None
    if len(fr) != 3:
        raise TunelabError("--fractions needs three numbers: train,validation,test", 2)
    counts = split_file(src, out_dir, fr, seed)
    console.print(", ".join(f"{k}: {v}" for k, v in counts.items()) + f" -> {out_dir}")


def data_preview(
    file: Annotated[Path, typer.Argument()],
    model: Annotated[str, typer.Option()] = "smollm2-135m-instruct",
    n: Annotated[int, typer.Option(help="how many examples")] = 2,
    train_on: Annotated[str, typer.Option(help="assistant | all | last_assistant")] = "assistant",
) -> None:
    """Show rendered examples with the trained tokens highlighted."""
    from tunelab.data.readers import read_records
    from tunelab.data.records import Conversation, Preference
    from tunelab.data.templates import preview

    tok = _tokenizer_for(model)
    for rec in read_records(file)[:n]:
        convs = rec.as_conversations() if isinstance(rec, Preference) else (rec,)
        for c in convs:
            assert isinstance(c, Conversation)
            line = c.source.line if c.source else "?"
            console.rule(f"{file}:{line}")
            console.print(preview(tok, c, train_on=train_on))
    console.print("[bold green on grey11]highlighted[/] = trained tokens")


def train_cmd(
    config: Annotated[Path | None, typer.Argument(help="run config YAML")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="override: key=value (dotted)")] = None,
    resume: Annotated[Path | None, typer.Option(help="continue the run in this folder")] = None,
    overwrite: Annotated[bool, typer.Option(help="replace an existing run folder")] = False,
) -> None:
    """Fine-tune a model from a YAML config."""
    from tunelab.config import load_config
    from tunelab.train.run import train

    if resume is not None:
        cfg_path = resume / "config.yaml"
        if not cfg_path.exists():
            raise TunelabError(f"{resume}: not a run folder (no config.yaml)", 2)
        overrides = [f"output_dir={resume}", *(set_ or [])]
        cfg = load_config(cfg_path, overrides)
    elif config is None:
        raise TunelabError("give a config file (tunelab train CONFIG.yaml) or --resume RUN_DIR", 2)
    else:
        cfg = load_config(config, set_ or [])
    res = train(cfg, resume=resume is not None, overwrite=overwrite, console=console)
    if os.environ.get("RANK", "0") != "0":  # under torchrun only rank 0 reports
        return
    st = res.state
    msg = f"done: {st.step} steps"
    best = st.describe_best()  # names the metric: validation loss, or reward for RL (higher is better)
    if best is not None:
        msg += f", {best}"
    if st.stopped_early:
        msg += " (stopped early; kept the best checkpoint)"
    console.print(msg)
    console.print(f"run folder: {res.run_dir}")


def merge_cmd(
    run: Annotated[str, typer.Argument(help="run folder or adapter folder")],
    out: Annotated[Path, typer.Option("--out", help="folder for the merged model")],
    dtype: Annotated[str, typer.Option(help="auto | bf16 | fp16 | fp32")] = "auto",
) -> None:
    """Fold the adapter into the base weights (W = W0 + BA) and save a standalone model."""
    from tunelab.model.adapters import merge_run

    p = merge_run(run, out, dtype)
    console.print(f"merged model written to {p}")


def _write_raw(text: str) -> None:
    """Exactly these bytes (UTF-8) on stdout: no wrapping, no markup, nothing added."""
    out = getattr(sys.stdout, "buffer", None)
    if out is None:  # a replaced stdout (tests): text only
        sys.stdout.write(text)
    else:
        sys.stdout.flush()
        out.write(text.encode("utf-8"))
    sys.stdout.flush()


def generate_cmd(
    target: Annotated[str, typer.Argument(help="base model name, run folder or adapter folder")],
    prompt: Annotated[list[str], typer.Option("--prompt", help="user message (repeatable: one reply each)")],
    system: Annotated[str | None, typer.Option(help="system prompt (default: the run's data.system_prompt)")] = None,
    max_tokens: Annotated[int, typer.Option(help="most tokens to generate")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.0,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="makes sampling repeatable")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="stop string (repeatable)")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print one JSON object: choices and usage")] = False,
) -> None:
    """Generate a reply from a base or fine-tuned model, through the same engine as `tunelab serve`.

    Piped (stdout not a terminal), the model's text is written byte for byte, replies separated by a newline.
    """
    from tunelab.generate import Generator

    gen = Generator.load(target)
    outs = gen.generate([[{"role": "user", "content": p}] for p in prompt], system=system, max_tokens=max_tokens,
                        temperature=temperature, top_p=top_p, seed=seed, stop=stop or ())
    if as_json:
        prompt_tokens = sum(o.prompt_tokens for o in outs)
        completion_tokens = sum(len(o.token_ids) for o in outs)
        obj = {"model": target, "choices": [{"index": i, "prompt": p, "text": o.text, "finish_reason": o.finish_reason}
                                            for i, (p, o) in enumerate(zip(prompt, outs, strict=True))],
               "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                         "total_tokens": prompt_tokens + completion_tokens}}
        _write_raw(json.dumps(obj, ensure_ascii=False) + "\n")
    elif not sys.stdout.isatty():
        _write_raw("\n".join(o.text for o in outs))
    else:
        for o in outs:
            console.print(o.text, markup=False, highlight=False)


def chat_cmd(
    target: Annotated[str, typer.Argument(help="base model name, run folder or adapter folder")],
    system: Annotated[str | None, typer.Option(help="system prompt (default: the run's data.system_prompt)")] = None,
    max_tokens: Annotated[int, typer.Option(help="most tokens per reply")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy")] = 0.7,
    top_p: Annotated[float, typer.Option(help="nucleus sampling mass")] = 1.0,
    seed: Annotated[int | None, typer.Option(help="makes sampling repeatable")] = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="stop string (repeatable)")] = None,
) -> None:
    """Interactive chat in the terminal (empty line or Ctrl-D to quit)."""
    from tunelab.generate import Generator

    gen = Generator.load(target)
    err_console.print(f"chatting with {gen.description}; empty line to quit", markup=False)
    history: list[dict[str, str]] = []
    while True:
        try:
            line = console.input("[bold]you> [/bold]")
        except EOFError:
            break
        if not line.strip():
            break
        history.append({"role": "user", "content": line})
        reply = gen.chat(history, system=system, max_tokens=max_tokens, temperature=temperature, top_p=top_p,
                         seed=seed, stop=stop or ())
        history.append({"role": "assistant", "content": reply})
        console.print("[bold cyan]model>[/bold cyan] ", end="")
        console.print(reply, markup=False, highlight=False)


def demo_cmd(
    out: Annotated[Path, typer.Option(help="run folder")] = Path("runs/demo"),
    steps: Annotated[int | None, typer.Option(help="override the number of training steps")] = None,
    limit: Annotated[int | None, typer.Option(help="evaluate on the first N test examples")] = None,
) -> None:
    """The main job: fine-tune SmolLM2-135M with LoRA on the clinical-note -> JSON task, then compare."""
    from tunelab.demo.run import run_demo

    run_demo(out, steps=steps, limit=limit, console=console)


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    data_app.command("validate")(data_validate)
    data_app.command("convert")(data_convert)
    data_app.command("split")(data_split)
    data_app.command("preview")(data_preview)
    app.command("train")(train_cmd)
    app.command("merge")(merge_cmd)
    app.command("generate")(generate_cmd)
    app.command("chat")(chat_cmd)
    app.command("demo")(demo_cmd)
