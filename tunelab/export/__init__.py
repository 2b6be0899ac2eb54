"""`tunelab export`: a run (or base model, or adapter folder) as artefacts other tools load.

    merged   the plain Hugging Face folder (adapter folded into the base, `tunelab merge`)
    gguf     one GGUF file: merged weights (f32, f16 or q8_0), tokenizer and chat template (llama.cpp, LM Studio)
    ollama   a folder with model.gguf and a Modelfile (TEMPLATE, SYSTEM, stop tokens, decoding parameters)

This module owns the choice of format and what is read from the run folder (its system prompt and decoding
settings); the GGUF file is `tunelab.export.gguf_file`'s, the Modelfile `tunelab.export.ollama`'s. Adapters are
merged with PEFT's `merge_and_unload` (`tunelab.model.adapters.load_for_inference`), never by hand.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tunelab.errors import TunelabError

Format = Literal["merged", "gguf", "ollama"]
FORMATS: tuple[Format, ...] = ("merged", "gguf", "ollama")
MODELFILE = "Modelfile"
OLLAMA_GGUF = "model.gguf"


@dataclass(frozen=True)
class ExportResult:
    """Where the export went: `path` is the file (gguf) or folder (merged, ollama); `files` what was written."""

    format: Format
    path: Path
    files: tuple[Path, ...]
    quant: str | None = None
    tokenizer_pre: str | None = None


def _run_settings(target: str) -> tuple[str | None, dict[str, float | int]]:
    """The run's system prompt and its recorded decoding (greedy, `eval.generation`) as Ollama parameters."""
    from tunelab.eval.config import EvalConfig, eval_config_from_dict
    from tunelab.model.adapters import read_run_config
    from tunelab.rundir import RunDir

    system, ev = None, EvalConfig()
    if RunDir(target).is_run():
        raw = read_run_config(Path(target))
        data = raw.get("data")
        system = data.get("system_prompt") if isinstance(data, dict) else None
        ev = eval_config_from_dict(raw.get("eval"), f"{target}/config.yaml")
    gen = ev.generation
    # temperature 0: the engine's default and eval's fixed decoding are greedy; Ollama's own defaults
    # (temperature 0.8, repeat_penalty 1.1) would answer differently from the model that was evaluated.
    params: dict[str, float | int] = {"temperature": 0, "repeat_penalty": gen.repetition_penalty,
                                      "num_predict": gen.max_new_tokens}
    return (system if isinstance(system, str) and system else None), params


def _load_merged(target: str) -> tuple[Any, Any]:
    from tunelab.model.adapters import load_for_inference

    model, tok, _ = load_for_inference(target, dtype="fp32", merge=True)
    return model, tok


def export(target: str, fmt: str, out: str | Path, *, quant: str = "f16") -> ExportResult:
    """Export `target` (run folder, adapter folder or base model) as `fmt` at `out` (see the module docstring)."""
    from tunelab.export.gguf_file import QUANTS, write_gguf

    outp = Path(out)
    if fmt not in FORMATS:
        raise TunelabError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}", 2)
    if fmt != "merged" and quant not in QUANTS:
        raise TunelabError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}", 2)
    from tunelab.rundir import RunDir

    rd = RunDir(target)
    if rd.is_run() and rd.weights is None:
        raise TunelabError(f"{target}: the run has no weights (adapter/ or model/) yet; has it finished?", 2)
    if fmt == "merged":
        from tunelab.model.adapters import merge_run

        p = merge_run(target, outp)
        return ExportResult("merged", p, tuple(sorted(q for q in p.iterdir() if q.is_file())))
    name = Path(target).name or str(target)
    if fmt == "gguf":
        if outp.is_dir():
            raise TunelabError(f"--out {outp} is a folder; give the .gguf file to write", 2)
        model, tok = _load_merged(target)
        s = write_gguf(model, tok, outp, quant=quant, name=name)  # type: ignore[arg-type]
        return ExportResult("gguf", s.path, (s.path,), quant, s.tokenizer_pre)
    from tunelab.export.ollama import modelfile

    if outp.exists() and not outp.is_dir():
        raise TunelabError(f"--out {outp} is a file; --format ollama writes a folder (model.gguf + Modelfile)", 2)
    model, tok = _load_merged(target)
    system, params = _run_settings(target)
    text = modelfile(tok, OLLAMA_GGUF, system_prompt=system, parameters=params)  # before the slow write
    s = write_gguf(model, tok, outp / OLLAMA_GGUF, quant=quant, name=name)  # type: ignore[arg-type]
    mf = outp / MODELFILE
    mf.write_text(text, encoding="utf-8")
    return ExportResult("ollama", outp, (s.path, mf), quant, s.tokenizer_pre)
