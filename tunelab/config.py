"""Run configuration: one YAML file validated once into frozen, typed pydantic models.

`load_config(path, overrides)` is the only entry point. Unknown keys are errors that name the key and suggest
the nearest valid one; values are checked here, so nothing downstream ever sees an untyped dict.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(_Strict):
    """Which base model to start from."""

    name: str = "smollm2-135m-instruct"
    """A hub id, a local directory, a .gguf file, or a built-in name (smollm2-135m-instruct)."""
    gguf_file: str | None = None
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto = bf16 where the hardware supports it, else fp32."""
    trust_remote_code: bool = False
    double_quant: bool = True
    """QLoRA only: quantize the quantization constants too."""


class LoraConfig(_Strict):
    r: int = Field(16, ge=1, le=1024)
    alpha: float = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    rslora: bool = False
    """Scale by alpha/sqrt(r) instead of alpha/r (stable at high ranks)."""
    # AdaLoRA: starts at init_r per matrix and prunes to target_r on average.
    init_r: int = Field(12, ge=1)
    target_r: int = Field(8, ge=1)
    tinit: int = Field(0, ge=0)
    tfinal: int = Field(0, ge=0)
    delta_t: int = Field(1, ge=1)


class DataMix(_Strict):
    path: str
    fraction: float = Field(0.2, gt=0, lt=1)
    """Fraction of the training examples that come from this general data set."""


class DataConfig(_Strict):
    train: str
    validation: str | None = None
    validation_fraction: float = Field(0.0, ge=0, lt=0.5)
    """Hold out this fraction of train for validation when no validation file is given."""
    test: str | None = None
    max_seq_len: int = Field(1024, ge=8)
    train_on: Literal["assistant", "all", "last_assistant"] = "assistant"
    packing: bool = True
    """Padding-free packing: examples concatenated with per-example position ids, no cross attention."""
    system_prompt: str | None = None
    """Prepended to every conversation that has no system message."""
    mix: DataMix | None = None


class TrainConfig(_Strict):
    epochs: float = Field(3, gt=0)
    max_steps: int | None = Field(None, ge=1)
    batch_size: int = Field(8, ge=1)
    """Examples per micro-batch per process."""
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_ratio: float = Field(0.03, ge=0, lt=1)
    warmup_steps: int | None = Field(None, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    max_grad_norm: float | None = Field(1.0, gt=0)
    gradient_checkpointing: bool = False
    optimizer: Literal["adamw", "paged_adamw"] = "adamw"
    seed: int = 42
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)
    """Validation every N optimizer steps (and at the end); None = at each epoch end."""
    eval_max_examples: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping: bool = False
    patience: int = Field(3, ge=1)


class EvalSection(_Strict):
    baseline: bool = True
    """Evaluate the base model on the validation set before the first step."""


class RunConfig(_Strict):
    model: ModelConfig = ModelConfig()
    method: Literal["sft"] = "sft"
    finetune: Literal["lora", "qlora", "dora", "adalora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalSection = EvalSection()
    output_dir: str = "runs/run"
    track: list[Literal["tensorboard", "mlflow"]] = []
    mlflow_uri: str | None = None
    """MLflow tracking URI; default is a local store inside the run folder."""

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.finetune == "adalora" and self.lora.target_r > self.lora.init_r:
            raise ValueError("lora.target_r must be <= lora.init_r for AdaLoRA")
        return self

    @property
    def uses_adapter(self) -> bool:
        return self.finetune != "full"


def _suggest(key: str, options: list[str]) -> str:
    close = difflib.get_close_matches(key, options, n=1, cutoff=0.5)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    cls: type[BaseModel] = RunConfig
    for part in path:
        if isinstance(part, int):
            continue
        field = cls.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        nxt = None
        for cand in (ann, *getattr(ann, "__args__", ())):
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                nxt = cand
        if nxt is None:
            return None
        cls = nxt
    return cls


def format_validation_error(e: ValidationError, source: str) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in e.errors():
        loc = tuple(err["loc"])
        dotted = ".".join(str(p) for p in loc)
        if err["type"] == "extra_forbidden":
            parent = _model_at(loc[:-1])
            hint = _suggest(str(loc[-1]), list(parent.model_fields)) if parent else ""
            lines.append(f"  {dotted}: unknown key{hint}")
        else:
            lines.append(f"  {dotted or '(top level)'}: {err['msg']}")
    return "\n".join(lines)


def _set_dotted(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    cur = d
    for p in parts[:-1]:
        nxt = cur.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {dotted}: {p!r} is not a section")
        cur = nxt
    cur[parts[-1]] = value


def parse_overrides(overrides: list[str]) -> list[tuple[str, Any]]:
    out = []
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"--set {o!r}: expected key=value, e.g. train.lr=1e-4")
        k, v = o.split("=", 1)
        out.append((k.strip(), yaml.safe_load(v) if v != "" else None))
    return out


def config_from_dict(raw: dict[str, Any], source: str = "config") -> RunConfig:
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{p}: config file not found")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: expected a mapping at the top level")
    for k, v in parse_overrides(overrides or []):
        _set_dotted(raw, k, v)
    return config_from_dict(raw, str(p))


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
