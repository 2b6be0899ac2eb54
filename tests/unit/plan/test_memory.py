"""`tunelab plan memory`: the guide's facts as test cases, the per-layer inventory against what autograd really
keeps, the budget search, the CLI's JSON and --measure on a tiny model."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.plan.arch import load_arch
from tunelab.plan.memory import (
    GB,
    Shape,
    estimate,
    largest_batch,
    largest_seq_len,
    layer_activation_bytes,
    parse_bytes,
)

CUDA = Shape(device="cuda", bf16_ok=True)


@pytest.fixture(scope="module")
def llama7b() -> Any:
    return load_arch("llama-2-7b")


def test_7b_fp16_weights_are_about_14_gb(llama7b: Any) -> None:
    # Guide: "A 7B model in FP16 requires 14 GB just to store".
    est = estimate(llama7b, replace(CUDA, method="lora", dtype="fp16"))
    assert 6.7e9 < llama7b.params < 6.8e9
    assert 13 * GB <= est.weights_bytes <= 14.5 * GB


def test_full_finetuning_of_7b_needs_60_to_80_gb(llama7b: Any) -> None:
    # Guide: weights 14 + gradients 14 + Adam 28 GB, "60-80 GB of VRAM total" (16-bit weights and states).
    est = estimate(llama7b, replace(CUDA, method="full", dtype="bf16", seq_len=2048))
    assert 60 * GB <= est.total_bytes <= 80 * GB
    assert est.gradients_bytes == est.weights_bytes
    # fp32 master weights (tunelab's default for full) need far more: no single 80 GB card holds them.
    assert estimate(llama7b, replace(CUDA, method="full", seq_len=2048)).total_bytes > 100 * GB


def test_lora_of_7b_fits_a_24_gb_card(llama7b: Any) -> None:
    # Guide: "Total VRAM for LoRA fine-tuning of a 7B model: roughly 16-18 GB, fitting on a single 24 GB GPU".
    short = estimate(llama7b, replace(CUDA, method="lora", seq_len=512))
    assert 15 * GB <= short.total_bytes <= 24 * GB
    long_ckpt = estimate(llama7b, replace(CUDA, method="lora", seq_len=2048, grad_ckpt=True))
    assert long_ckpt.total_bytes <= 24 * GB
    assert short.optimizer_bytes < 0.5 * GB  # "less than 300 MB for optimizer states" (plus Adam's temporaries)


def test_qlora_of_65b_fits_one_48_gb_gpu() -> None:
    # Guide: QLoRA makes "it possible to fine-tune a 65B-parameter model on a single 48 GB GPU".
    arch = load_arch("llama-65b")
    shape = replace(CUDA, method="qlora", seq_len=512, grad_ckpt=True, optimizer="paged_adamw")
    est = estimate(arch, shape)
    assert est.total_bytes <= 48 * GB
    assert 30 * GB < est.weights_bytes < 40 * GB  # ~0.52 bytes per quantized weight
    # ... and plain 16-bit LoRA of the same model does not come close.
    assert estimate(arch, replace(shape, method="lora")).total_bytes > 120 * GB


def test_presets_are_the_published_sizes() -> None:
    sizes = {"llama-3.1-8b": 8.03e9, "mistral-7b": 7.24e9, "qwen2.5-7b": 7.62e9}
    for name, n in sizes.items():
        assert abs(load_arch(name).params - n) / n < 0.01, name


def test_local_folder_counts_the_real_parameters(tiny_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    arch = load_arch(str(tiny_dir))
    real = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert arch.params == sum(p.numel() for p in real.parameters())
    assert {lin.name for lin in arch.layer_linears} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"}


def _saved_bytes_of_one_layer(tiny_dir: Path, method: str, autocast: bool, tokens: int) -> float:
    """What autograd keeps for one decoder layer (unique storages, parameters excluded)."""
    from tunelab.config import LoraConfig
    from tunelab.model.adapters import apply_finetune
    from tunelab.model.loading import load_model

    model, _ = load_model(str(tiny_dir), dtype="fp32" if method == "full" or not autocast else "bf16", device="cpu")
    model = apply_finetune(model, method, LoraConfig(dropout=0.05))  # the dropout Shape() models
    model.train()
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    skip = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    layer = base.model.layers[1]
    x = torch.randn(1, tokens, base.config.hidden_size, dtype=base.model.embed_tokens.weight.dtype, requires_grad=True)
    pos = torch.arange(tokens)[None]
    pe = base.model.rotary_emb(x, pos)
    skip |= {t.untyped_storage().data_ptr() for t in pe}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        k = t.untyped_storage().data_ptr()
        if k not in skip:
            seen[k] = t.untyped_storage().nbytes()
        return t

    ctx = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else torch.autocast("cpu", enabled=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), ctx:
        layer(x, position_embeddings=pe, position_ids=pos, attention_mask=None)
    return float(sum(seen.values()))


@pytest.mark.parametrize("method,autocast", [("lora", False), ("lora", True), ("full", False), ("full", True)])
def test_layer_inventory_matches_autograd(tiny_dir: Path, method: str, autocast: bool) -> None:
    tokens = 64
    arch = load_arch(str(tiny_dir))
    shape = Shape(method=method, device="cpu", bf16_ok=autocast, dtype="auto")  # type: ignore[arg-type]
    want = layer_activation_bytes(arch, shape) * tokens
    if autocast and method == "full":  # the layer's bf16 weight copies are kept too
        want += arch.linear_params / arch.layers * 2
    if autocast and method == "lora":
        from tunelab.plan.memory import adapter_params

        want += adapter_params(arch, shape) / arch.layers * 2
    got = _saved_bytes_of_one_layer(tiny_dir, method, autocast, tokens)
    assert abs(want - got) / got < 0.03, (want, got)


def test_gradient_checkpointing_and_qlora_cut_memory(llama7b: Any) -> None:
    lora = estimate(llama7b, replace(CUDA, method="lora", seq_len=2048))
    assert estimate(llama7b, replace(CUDA, method="lora", seq_len=2048, grad_ckpt=True)).activations_bytes < \
        lora.activations_bytes / 5
    assert estimate(llama7b, replace(CUDA, method="qlora", seq_len=2048)).weights_bytes < lora.weights_bytes / 3
    full = replace(CUDA, method="full", dtype="bf16", seq_len=2048)
    # 8-bit Adam: 2 bytes of state per parameter against 4 for bf16 states (and no step temporaries).
    assert estimate(llama7b, replace(full, optimizer="adamw8bit")).optimizer_bytes == 2 * llama7b.params
    sharded = estimate(llama7b, replace(full, processes=4, fsdp=True))
    assert sharded.weights_bytes == estimate(llama7b, full).weights_bytes // 4


def test_budget_search_is_tight(llama7b: Any) -> None:
    s = replace(CUDA, method="lora", seq_len=1024)
    budget = 24 * GB
    b = largest_batch(llama7b, s, budget)
    assert b >= 1
    assert estimate(llama7b, replace(s, batch=b)).total_bytes <= budget < estimate(llama7b, replace(s, batch=b + 1)).total_bytes
    n = largest_seq_len(llama7b, s, budget)
    assert estimate(llama7b, replace(s, seq_len=n)).total_bytes <= budget
    assert estimate(llama7b, replace(s, seq_len=n + 128)).total_bytes > budget
    assert largest_batch(llama7b, replace(CUDA, method="full"), 24 * GB) == 0


def test_parse_bytes() -> None:
    assert parse_bytes("24GB") == 24 * 10**9
    assert parse_bytes("24 GiB") == 24 * 2**30
    assert parse_bytes("500MB") == 500 * 10**6
    with pytest.raises(TunelabError, match="--budget"):
        parse_bytes("lots")


def test_cli_json_and_budget(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plan", "memory", "llama-2-7b", "--method", "lora", "--seq-len", "512", "--device", "cuda",
              "--budget", "24GB", "--json"])
    assert e.value.code == 0
    d = json.loads(capsys.readouterr().out)
    for k in ("weights_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes", "logits_bytes",
              "adapters_bytes", "overhead_bytes", "total_bytes"):
        assert isinstance(d[k], int)
    assert d["budget"]["fits"] is True and d["budget"]["largest_batch_at_seq_len"] >= 1


def test_cli_table_and_bad_flags(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plan", "memory", "mistral-7b", "--method", "qlora", "--device", "cuda"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "weights" in out and "activations" in out and "peak" in out
    with pytest.raises(SystemExit) as e:
        main(["plan", "memory", "mistral-7b", "--method", "ia3"])
    assert e.value.code == 2
    assert "--method 'ia3'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        main(["plan", "memory", "no-such-preset-or-folder/../x"])
    assert e.value.code == 2


def test_measure_runs_real_steps(tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plan", "memory", str(tiny_dir), "--method", "lora", "--seq-len", "32", "--batch", "2",
              "--device", "cpu", "--measure", "--json"])
    assert e.value.code == 0
    d = json.loads(capsys.readouterr().out)
    m = d["measure"]
    assert m["steps"] == 3 and m["measured_bytes"] >= m["model_tensor_bytes"] > 0
    assert d["measured_bytes"] == m["measured_bytes"] and "error_pct" in d


def test_hub_id_needs_the_config_only(tmp_path: Path, tiny_dir: Path) -> None:
    """A hub id is read from its config.json alone (counted on the meta device): a hub cache holding nothing but
    config.json, offline, gives the same architecture as the full local folder."""
    import os
    import subprocess
    import sys

    root = tmp_path / "hf" / "hub" / "models--someorg--tiny-llama"
    snap = root / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    (snap / "config.json").write_text((tiny_dir / "config.json").read_text())
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text("0" * 40)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "tunelab.cli", "plan", "memory", "someorg/tiny-llama", "--method", "lora",
                        "--device", "cpu", "--json"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    d = json.loads(p.stdout[p.stdout.index("{"):])
    local = load_arch(str(tiny_dir))
    assert d["weights_bytes"] > 0 and d["params"] == local.params, d
