"""Shared by the export tests: a real 3-step LoRA run (`tunelab.train.run.train`) on the tiny BPE Llama of
`export_fixtures`, and its exports (f16 and q8_0 GGUF files, an Ollama folder), built once per session."""

from __future__ import annotations

import json

import pytest
from export_fixtures import RUN_SYSTEM, WORDS, Exported, save_base


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Exported:
    from tunelab.config import config_from_dict
    from tunelab.export import export
    from tunelab.train.run import train

    root = tmp_path_factory.mktemp("export")
    base = save_base(root / "base")
    rows = [{"messages": [{"role": "user", "content": f"echo {a} {b}"}, {"role": "assistant", "content": f"{a} {b}"}]}
            for a in WORDS[:6] for b in WORDS[6:10]]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    cfg = config_from_dict({"model": {"name": str(base), "dtype": "fp32"}, "finetune": "lora",
                            "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                            "data": {"train": str(data), "system_prompt": RUN_SYSTEM, "check_contamination": False},
                            "train": {"max_steps": 3, "batch_size": 8, "lr": 5e-3},
                            "eval": {"baseline": False, "generation": {"max_new_tokens": 64}},
                            "output_dir": str(root / "run")})
    train(cfg, overwrite=True, show_progress=False)
    run = root / "run"
    f16 = export(str(run), "gguf", root / "run-f16.gguf").path
    q8 = export(str(run), "gguf", root / "run-q8_0.gguf", quant="q8_0").path
    oll = export(str(run), "ollama", root / "ollama").path
    return Exported(base, run, f16, q8, oll)
