"""Apply a fine-tuning mode to a loaded base model (full, LoRA, DoRA, AdaLoRA, QLoRA) through PEFT, and
load or merge finished runs. Adapters are saved in PEFT's own format; nothing here reimplements PEFT.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from tunelab.config import LoraConfig as LoraSection
from tunelab.errors import TunelabError
from tunelab.rundir import ADAPTER_CONFIG, RunDir

log = logging.getLogger(__name__)


def peft_config(kind: str, lora: LoraSection, total_steps: int | None = None) -> Any:
    from peft import AdaLoraConfig, LoraConfig, TaskType

    common: dict[str, Any] = dict(
        task_type=TaskType.CAUSAL_LM,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.rslora,
        bias="none",
    )
    if kind == "adalora":
        if not total_steps:
            raise TunelabError("AdaLoRA needs the total number of training steps", 2)
        # AdaLoRA's schedule must fit inside training: keep the final fine-tuning phase within total_steps.
        tfinal = lora.tfinal or max(1, total_steps // 5)
        tinit = min(lora.tinit, max(0, total_steps - tfinal - 1))
        return AdaLoraConfig(
            init_r=lora.init_r, target_r=lora.target_r, tinit=tinit, tfinal=tfinal,
            deltaT=lora.delta_t, total_step=total_steps, **common,
        )
    return LoraConfig(r=lora.r, use_dora=(kind == "dora"), **common)


def apply_finetune(
    model: Any, kind: str, lora: LoraSection, *, total_steps: int | None = None, gradient_checkpointing: bool = False
) -> Any:
    """Return the model ready to train: adapters attached (or all weights trainable for `full`)."""
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import get_peft_model, prepare_model_for_kbit_training

    if kind == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif gradient_checkpointing:
        model.enable_input_require_grads()
    pm = get_peft_model(model, peft_config(kind, lora, total_steps))
    # Record the base under a name other tools resolve (a built-in's hub id, an absolute path; never a cache
    # path or a tunelab-only name), so the adapter says what it belongs to.
    base = getattr(model, "tunelab_base_name", None)
    if base:
        from tunelab.model.names import portable_name

        for cfg in pm.peft_config.values():
            cfg.base_model_name_or_path = portable_name(base)
    return pm


def read_run_config(run_dir: Path) -> dict[str, Any]:
    import yaml

    p = RunDir(run_dir).config_path
    if not p.exists():
        raise TunelabError(f"{run_dir}: not a tunelab run folder (no config.yaml)", 2)
    data = yaml.safe_load(p.read_text())
    assert isinstance(data, dict)
    return data


def adapter_dir_of(path: Path) -> Path | None:
    """An adapter folder itself, or a run folder's adapter/ (tunelab.rundir's rule)."""
    if (path / ADAPTER_CONFIG).exists():
        return path
    return RunDir(path).adapter


def load_for_inference(target: str, *, dtype: str = "auto", merge: bool = False) -> tuple[Any, Any, str]:
    """Load a base model name, a full-weights run, an adapter folder or a run folder.
    Returns (model, tokenizer, description)."""
    from tunelab.model.loading import load_model

    p = Path(target)
    rd = RunDir(p)
    if p.is_dir() and rd.is_run() and rd.full_model is not None:  # full fine-tune run
        model, tok = load_model(str(rd.full_model), dtype=dtype)
        return model.eval(), tok, f"{p} (full fine-tune)"
    ad = adapter_dir_of(p) if p.is_dir() else None
    if ad is None:
        model, tok = load_model(target, dtype=dtype)
        return model.eval(), tok, f"{target} (base)"
    base = None
    if rd.is_run():
        mc = read_run_config(p).get("model", {})
        base = mc.get("name") if isinstance(mc, dict) else None
    if base is None:
        base = json.loads((ad / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base:
        raise TunelabError(f"{ad}: adapter does not record its base model", 2)
    from peft import PeftModel

    model, tok = load_model(base, dtype=dtype)
    tok_dir = rd.tokenizer_dir
    if tok_dir.is_dir():
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(tok_dir)
    try:
        pm = PeftModel.from_pretrained(model, str(ad))
    except (RuntimeError, ValueError) as e:
        raise TunelabError(f"{ad}: adapter does not fit base model {base!r}: {str(e).splitlines()[0]}", 2) from e
    if merge:
        return pm.merge_and_unload().eval(), tok, f"{p} (merged into {base})"
    return pm.eval(), tok, f"{p} (adapter on {base})"


def merge_run(target: str, out: str | Path, dtype: str = "auto") -> Path:
    """Write a standalone model with W = W0 + BA folded in; loadable with from_pretrained, no PEFT needed."""
    model, tok, _ = load_for_inference(target, dtype=dtype, merge=True)
    outp = Path(out)
    outp.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(outp)
    tok.save_pretrained(outp)
    return outp
