"""`tunelab export` from the command line: each format, and bad input as a one-line error with exit code 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from export_fixtures import Exported

from tunelab.cli import main


def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as e:
        main(args)
    return int(e.value.code or 0)


def test_formats(exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import gguf
    import torch
    from transformers import AutoModelForCausalLM

    from tunelab.model.adapters import load_for_inference

    assert run_cli(["export", str(exported.run), "--out", str(tmp_path / "m.gguf")]) == 0  # gguf f16 by default
    out = capsys.readouterr().out
    assert f"gguf export written to {tmp_path / 'm.gguf'} (f16, pre-tokenizer gpt-2)" in out
    assert gguf.GGUFReader(tmp_path / "m.gguf").fields["general.name"].contents() == "run"

    assert run_cli(["export", str(exported.run), "--format", "merged", "--out", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file() and not (tmp_path / "hf" / "adapter_config.json").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32)  # no PEFT needed
    # `tunelab merge`'s default dtype, kept: `auto` (bf16 where the CPU runs it natively, else fp32).
    merged, _, _ = load_for_inference(str(exported.run), dtype="auto", merge=True)
    want = merged.state_dict()
    for k, v in plain.state_dict().items():
        torch.testing.assert_close(v, want[k].float(), rtol=0, atol=0)

    assert run_cli(["export", str(exported.run), "--format", "ollama", "--quant", "q8_0",
                    "--out", str(tmp_path / "oll")]) == 0
    out = capsys.readouterr().out
    assert "ollama create NAME -f" in out and (tmp_path / "oll" / "Modelfile").is_file()
    r = gguf.GGUFReader(tmp_path / "oll" / "model.gguf")
    assert r.fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_Q8_0


@pytest.mark.parametrize(("args", "message"), [
    (["--format", "zip"], "error: --format must be one of merged, gguf, ollama, got 'zip'"),
    (["--quant", "q4"], "error: --quant must be one of f32, f16, q8_0, got 'q4'"),
])
def test_bad_options(exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                     message: str) -> None:
    assert run_cli(["export", str(exported.run), "--out", str(tmp_path / "x"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()


def test_bad_targets(exported: Exported, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    shutil.copy(exported.run / "config.yaml", unfinished / "config.yaml")
    assert run_cli(["export", str(unfinished), "--out", str(tmp_path / "u.gguf")]) == 2
    assert "the run has no weights (adapter/ or model/) yet" in capsys.readouterr().err
    assert run_cli(["export", str(exported.run), "--out", str(tmp_path)]) == 2
    assert f"--out {tmp_path} is a folder; give the .gguf file to write" in capsys.readouterr().err
    assert run_cli(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err
