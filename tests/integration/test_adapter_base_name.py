"""adapter_config.json names a base other tools resolve: the built-in's hub id (HuggingFaceTB/SmolLM2-135M-Instruct),
an absolute path otherwise; PEFT's AutoPeftModelForCausalLM loads the adapter offline from a local hub cache
(built in the test's HF_HOME: no downloads), and tunelab maps the hub id back to its built-in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tiny
import torch

from tunelab.config import LoraConfig
from tunelab.model.adapters import apply_finetune
from tunelab.model.names import builtin_for, portable_name

HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _hub_cache(hf_home: Path, repo: str, files_from: Path) -> None:
    """The Hugging Face hub cache layout: hub/models--ORG--NAME/{refs/main, snapshots/COMMIT/...}."""
    commit = "0" * 40
    root = hf_home / "hub" / ("models--" + repo.replace("/", "--"))
    snap = root / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in files_from.iterdir():
        if f.is_file():
            try:
                os.link(f, snap / f.name)
            except OSError:
                shutil.copy2(f, snap / f.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(commit)


def _adapter_on(model: Any, base_name: str, out: Path) -> Any:
    model.tunelab_base_name = base_name  # what tunelab.model.loading sets on every model it loads
    pm = apply_finetune(model, "lora", LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():  # non-zero B so the adapter changes the output
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    pm.save_pretrained(out)
    return pm.eval()  # no dropout: compared with PEFT's loaded (eval) model


_PEFT_LOAD = """
import sys, torch
from peft import AutoPeftModelForCausalLM
m = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
with torch.no_grad():
    torch.save(m(torch.tensor([[5, 6, 7, 8]])).logits, sys.argv[2])
"""


def _peft_logits_offline(adapter: Path, hf_home: Path, out: Path) -> torch.Tensor:
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_CACHE", None)
    r = subprocess.run([sys.executable, "-c", _PEFT_LOAD, str(adapter), str(out)], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return torch.load(out)


def test_names_other_tools_resolve(tmp_path: Path) -> None:
    assert portable_name("smollm2-135m-instruct") == HUB_ID
    assert portable_name(str(tmp_path / ".." / tmp_path.name)) == str(tmp_path.resolve())
    assert portable_name("org/some-model") == "org/some-model"
    assert builtin_for(HUB_ID) == builtin_for(HUB_ID.lower()) == "smollm2-135m-instruct"
    assert builtin_for("org/some-model") is None


def test_builtin_adapter_loads_offline_with_peft_from_the_hub_cache(tmp_path: Path) -> None:
    """The tiny model stands in for SmolLM2 in the hub cache (same layout; a format test, in seconds)."""
    base = tiny.save_tiny(tmp_path / "tiny")
    from transformers import AutoModelForCausalLM

    pm = _adapter_on(AutoModelForCausalLM.from_pretrained(base), "smollm2-135m-instruct", tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == HUB_ID
    _hub_cache(tmp_path / "hf", HUB_ID, base)
    got = _peft_logits_offline(tmp_path / "adapter", tmp_path / "hf", tmp_path / "logits.pt")
    with torch.no_grad():
        want = pm(torch.tensor([[5, 6, 7, 8]])).logits
    torch.testing.assert_close(got, want)


def test_local_base_is_recorded_as_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    base = tiny.save_tiny(tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    from transformers import AutoModelForCausalLM

    _adapter_on(AutoModelForCausalLM.from_pretrained(base), "tiny", tmp_path / "adapter")
    recorded = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert recorded == str(base.resolve())


def test_tunelab_maps_the_hub_id_back_to_the_builtin(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.model import loading

    monkeypatch.setattr(loading, "_in_hub_cache", lambda repo: False)
    monkeypatch.setattr(loading, "convert_gguf", lambda gguf: Path("/converted/smollm2"))
    monkeypatch.setattr(loading, "_builtin_gguf", lambda name: Path(f"/pkg/{name}.gguf"))
    r = loading.resolve_model(HUB_ID)
    assert (r.path, r.display_name) == ("/converted/smollm2", "smollm2-135m-instruct")
    monkeypatch.setattr(loading, "_in_hub_cache", lambda repo: True)  # a real hub copy is used as is
    assert loading.resolve_model(HUB_ID).path == HUB_ID


@pytest.mark.slow
def test_real_smollm2_adapter_loads_offline_with_peft(tmp_path: Path) -> None:
    """The converted SmolLM2 files placed in the hub cache layout, an adapter on them, PEFT loading offline."""
    from tunelab.model.loading import load_model, resolve_model

    model, _ = load_model("smollm2-135m-instruct", dtype="fp32")
    pm = _adapter_on(model, "smollm2-135m-instruct", tmp_path / "adapter")
    _hub_cache(tmp_path / "hf", HUB_ID, Path(resolve_model("smollm2-135m-instruct").path))
    got = _peft_logits_offline(tmp_path / "adapter", tmp_path / "hf", tmp_path / "logits.pt")
    with torch.no_grad():
        want = pm(torch.tensor([[5, 6, 7, 8]])).logits
    # Same weights, other process: fp32 sums over 576-wide rows in another thread count differ by ~1e-3 on
    # logits of size ~20 (measured 1.6e-3), so the bound is on that scale; the predictions must be the same.
    torch.testing.assert_close(got, want, atol=5e-3, rtol=1e-3)
    assert torch.equal(got.argmax(-1), want.argmax(-1))
