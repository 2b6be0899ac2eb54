"""`tunelab export RUN --format merged|gguf|ollama --out PATH [--quant f16|q8_0|f32]`: thin over `tunelab.export`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def export_cmd(
    run: Annotated[str, typer.Argument(help="run folder, adapter folder or base model")],
    out: Annotated[Path, typer.Option("--out", help="the .gguf file (gguf), or the folder (merged, ollama)")],
    fmt: Annotated[str, typer.Option("--format", help="merged | gguf | ollama")] = "gguf",
    quant: Annotated[str, typer.Option("--quant", help="GGUF weights: f16 | q8_0 | f32")] = "f16",
) -> None:
    """Export a run for other tools: a merged HF folder, a GGUF file (llama.cpp), or an Ollama folder."""
    from tunelab.export import export

    res = export(run, fmt, out, quant=quant)
    detail = f" ({res.quant}, pre-tokenizer {res.tokenizer_pre})" if res.quant else ""
    typer.echo(f"{res.format} export written to {res.path}{detail}")
    for f in res.files:
        typer.echo(f"  {f} ({f.stat().st_size:,} bytes)")
    if res.format == "ollama":
        typer.echo(f"  load it with: ollama create NAME -f {res.path / 'Modelfile'}")


def register(app: typer.Typer, data_app: typer.Typer) -> None:
    app.command("export")(export_cmd)
