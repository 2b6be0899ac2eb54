"""From a job-creation request to a tunelab `RunConfig`: request schema, "auto" hyperparameters and tunelab's
own options.

What "auto" picks (mirrors OpenAI's published rules where they are known; see docs/jobs.md):
  * n_epochs: OpenAI's cookbook rule -- 3 epochs, raised so that epochs x examples >= 100 (at most 25 epochs),
    lowered so that it stays <= 25,000 (at least 1 epoch).
  * batch_size: OpenAI's documented default -- about 0.2% of the training examples, at least 1, at most 256.
    Micro-batches of at most `micro_batch_size` (default 8) are accumulated to reach it exactly.
  * learning_rate_multiplier: 1.0, i.e. tunelab's base learning rate for the fine-tuning kind (LoRA/QLoRA/DoRA
    2e-4, full 2e-5). OpenAI's multiplier scales a base rate it does not publish; ours scales a known one.
  * dpo beta: 0.1 (OpenAI's and tunelab's default).

tunelab's own options travel in `extra_body={"tunelab": {...}}` or as `metadata` keys `tunelab.<option>`
(string values, parsed as YAML scalars); both are validated by `TunelabOptions` (unknown names are errors).
"""

from __future__ import annotations

import math
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tunelab.config import RunConfig, config_from_dict
from tunelab.errors import ConfigError

Auto = Literal["auto"]

BASE_LR = {"lora": 2e-4, "qlora": 2e-4, "dora": 2e-4, "full": 2e-5}
MAX_SUFFIX = 64


class _Req(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Req):
    n_epochs: int | Auto | None = None
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None
    beta: float | Auto | None = None  # dpo only

    @field_validator("n_epochs")
    @classmethod
    def _epochs(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 50:
            raise ValueError("must be between 1 and 50")
        return v

    @field_validator("batch_size")
    @classmethod
    def _batch(cls, v: Any) -> Any:
        if isinstance(v, int) and not 1 <= v <= 256:
            raise ValueError("must be between 1 and 256")
        return v

    @field_validator("learning_rate_multiplier", "beta")
    @classmethod
    def _positive(cls, v: Any) -> Any:
        if isinstance(v, float) and not v > 0:
            raise ValueError("must be greater than 0")
        return v


class _MethodHyper(_Req):
    hyperparameters: Hyperparameters | None = None


class Method(_Req):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: _MethodHyper | None = None
    dpo: _MethodHyper | None = None
    reinforcement: dict[str, Any] | None = None


class TunelabOptions(_Req):
    """tunelab's own knobs, beyond OpenAI's. Every field is optional; unset ones keep tunelab's defaults."""

    finetune: Literal["lora", "qlora", "dora", "full"] | None = None
    lora_r: int | None = Field(None, ge=1, le=1024)
    lora_alpha: float | None = Field(None, gt=0)
    lora_dropout: float | None = Field(None, ge=0, lt=1)
    target_modules: list[str] | Literal["all-linear"] | None = None
    max_seq_len: int | None = Field(None, ge=8)
    max_steps: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    eval_every: int | None = Field(None, ge=1)
    micro_batch_size: int | None = Field(None, ge=1, le=256)
    learning_rate: float | None = Field(None, gt=0)
    """Absolute base learning rate (the multiplier still applies)."""
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    schedule: Literal["cosine", "linear", "constant"] | None = None
    packing: bool | None = None
    train_on: Literal["assistant", "all", "last_assistant"] | None = None
    gradient_checkpointing: bool | None = None
    early_stopping: bool | None = None


class JobCreate(_Req):
    model: str
    training_file: str
    validation_file: str | None = None
    hyperparameters: Hyperparameters | None = None
    suffix: str | None = Field(None, max_length=MAX_SUFFIX)
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    metadata: dict[str, str] | None = None
    method: Method | None = None
    integrations: list[Any] | None = None
    tunelab: TunelabOptions | None = None

    @field_validator("metadata")
    @classmethod
    def _meta(cls, v: dict[str, str] | None) -> dict[str, str] | None:
        if v is None:
            return v
        if len(v) > 16:
            raise ValueError("at most 16 keys")
        for k, val in v.items():
            if len(k) > 64 or len(val) > 512:
                raise ValueError(f"key {k[:64]!r}: keys are at most 64 characters and values at most 512")
        return v

    @field_validator("suffix")
    @classmethod
    def _suffix(cls, v: str | None) -> str | None:
        if v is not None and (not v or any(not (c.isalnum() or c in "-_.") for c in v)):
            raise ValueError("use letters, digits, '-', '_' and '.' only")
        return v


class OptionError(ValueError):
    def __init__(self, message: str, param: str) -> None:
        super().__init__(message)
        self.message, self.param = message, param


def method_type(req: JobCreate) -> str:
    return req.method.type if req.method else "supervised"


def requested_hyperparameters(req: JobCreate) -> Hyperparameters:
    """The hyperparameters in force: `method.<type>.hyperparameters` wins over the top-level (deprecated) ones."""
    top = req.hyperparameters or Hyperparameters()
    section = getattr(req.method, method_type(req), None) if req.method else None
    inner = section.hyperparameters if isinstance(section, _MethodHyper) and section.hyperparameters else None
    merged = top.model_dump(exclude_none=True)
    if inner is not None:
        merged.update(inner.model_dump(exclude_none=True))
    return Hyperparameters.model_validate(merged)


def tunelab_options(req: JobCreate) -> TunelabOptions:
    """Options from `metadata` keys `tunelab.<name>` and from `extra_body={"tunelab": {...}}` (which wins)."""
    raw: dict[str, Any] = {}
    for k, v in (req.metadata or {}).items():
        if k.startswith("tunelab."):
            try:
                raw[k.removeprefix("tunelab.")] = yaml.safe_load(v) if v != "" else None
            except yaml.YAMLError:
                raw[k.removeprefix("tunelab.")] = v
    if req.tunelab is not None:
        raw.update(req.tunelab.model_dump(exclude_none=True))
    try:
        return TunelabOptions.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"])
        msg = "unknown tunelab option" if err["type"] == "extra_forbidden" else err["msg"]
        raise OptionError(f"tunelab option {name!r}: {msg}", param=f"tunelab.{name}") from None


# ---------------------------------------------------------------------------------------------- auto rules
def auto_epochs(n_examples: int) -> int:
    """OpenAI cookbook: target 3 epochs, keep examples x epochs within [100, 25000], epochs within [1, 25]."""
    target, lo_ex, hi_ex, lo_ep, hi_ep = 3, 100, 25_000, 1, 25
    n = max(1, n_examples)
    if n * target < lo_ex:
        return min(hi_ep, lo_ex // n)
    if n * target > hi_ex:
        return max(lo_ep, hi_ex // n)
    return target


def auto_batch_size(n_examples: int) -> int:
    """OpenAI's documented default: ~0.2% of the training examples, capped at 256."""
    return max(1, min(256, round(0.002 * n_examples)))


def split_batch(batch: int, micro_cap: int) -> tuple[int, int]:
    """(micro_batch, grad_accum) with micro <= micro_cap and micro x accum == batch exactly."""
    micro = max(d for d in range(1, min(batch, micro_cap) + 1) if batch % d == 0)
    return micro, batch // micro


# ---------------------------------------------------------------------------------------------- config
def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    for p in parts[:-1]:
        d = d.setdefault(p, {})
    d[parts[-1]] = value


def build_config(
    *, base_model: str, train_path: str, valid_path: str | None, output_dir: str, req: JobCreate,
    n_examples: int, server_sets: list[tuple[str, Any]] = (),  # type: ignore[assignment]
) -> tuple[RunConfig, dict[str, Any]]:
    """The job's RunConfig and the hyperparameters it resolves to (OpenAI field names, no "auto" left).

    Order: tunelab defaults <- resolved hyperparameters <- the server's `--set` overrides <- the job's
    tunelab options. Raises OptionError naming the offending parameter.
    """
    opts = tunelab_options(req)
    hp = requested_hyperparameters(req)
    mtype = method_type(req)
    finetune = opts.finetune or "lora"
    raw: dict[str, Any] = {"model": {"name": base_model}, "finetune": finetune,
                           "data": {"train": train_path}, "output_dir": output_dir}
    if valid_path:
        raw["data"]["validation"] = valid_path
    epochs = auto_epochs(n_examples) if hp.n_epochs in (None, "auto") else int(hp.n_epochs)  # type: ignore[arg-type]
    batch = auto_batch_size(n_examples) if hp.batch_size in (None, "auto") else int(hp.batch_size)  # type: ignore[arg-type]
    mult = 1.0 if hp.learning_rate_multiplier in (None, "auto") else float(hp.learning_rate_multiplier)  # type: ignore[arg-type]
    micro, accum = split_batch(batch, opts.micro_batch_size or 8)
    base_lr = opts.learning_rate or BASE_LR[finetune]
    _set(raw, "train.epochs", epochs)
    _set(raw, "train.batch_size", micro)
    _set(raw, "train.grad_accum", accum)
    _set(raw, "train.lr", base_lr * mult)
    if req.seed is not None:
        _set(raw, "train.seed", req.seed)
    if mtype == "dpo":
        raw["method"] = "dpo"
        _set(raw, "dpo.beta", 0.1 if hp.beta in (None, "auto") else float(hp.beta))  # type: ignore[arg-type]
    elif mtype == "reinforcement":
        raise OptionError("method 'reinforcement' is not supported by this server (use supervised or dpo)",
                          param="method.type")
    for k, v in server_sets:
        _set(raw, k, v)
    mapping = {"lora_r": "lora.r", "lora_alpha": "lora.alpha", "lora_dropout": "lora.dropout",
               "target_modules": "lora.target_modules", "max_seq_len": "data.max_seq_len",
               "max_steps": "train.max_steps", "save_every": "train.save_every", "eval_every": "train.eval_every",
               "warmup_ratio": "train.warmup_ratio", "schedule": "train.schedule", "packing": "data.packing",
               "train_on": "data.train_on", "gradient_checkpointing": "train.gradient_checkpointing",
               "early_stopping": "train.early_stopping"}
    for name, dotted in mapping.items():
        value = getattr(opts, name)
        if value is not None:
            _set(raw, dotted, value)
    # Checkpoints (servable, and where pause stops) about 4 times per run and at least once per epoch; the
    # validation loss is measured at each checkpoint so the checkpoint's metrics carry it.
    t = raw["train"]
    per_epoch = max(1, math.ceil(n_examples / (t["batch_size"] * t["grad_accum"])))
    total = t.get("max_steps") or max(1, math.ceil(float(t["epochs"]) * per_epoch))
    t.setdefault("save_every", max(1, min(per_epoch, math.ceil(total / 4))))
    if valid_path:
        t.setdefault("eval_every", t["save_every"])
    t.setdefault("keep_checkpoints", 2)
    try:
        cfg = config_from_dict(raw, "job")
    except ConfigError as e:
        raise OptionError(e.message, param="tunelab") from None
    resolved: dict[str, Any] = {
        "n_epochs": int(cfg.train.epochs) if float(cfg.train.epochs).is_integer() else cfg.train.epochs,
        "batch_size": cfg.train.batch_size * cfg.train.grad_accum,
        "learning_rate_multiplier": round(cfg.train.lr / BASE_LR[finetune] if not opts.learning_rate else mult, 6),
    }
    if mtype == "dpo":
        resolved["beta"] = cfg.dpo.beta
    return cfg, resolved


def total_steps(cfg: RunConfig, n_examples: int) -> int:
    per_epoch = max(1, math.ceil(n_examples / (cfg.train.batch_size * cfg.train.grad_accum)))
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
