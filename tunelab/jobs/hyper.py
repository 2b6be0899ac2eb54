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

import json
import math
import os
import string
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator

from tunelab.config import RunConfig, config_from_dict
from tunelab.errors import ConfigError

Auto = Literal["auto"]

BASE_LR = {"lora": 2e-4, "qlora": 2e-4, "dora": 2e-4, "full": 2e-5}
MAX_SUFFIX = 64
MAX_LR = 1e-2
SUFFIX_CHARS = frozenset(string.ascii_letters + string.digits + "-_.")
MODULE_CHARS = frozenset(string.ascii_letters + string.digits + "_.")

# name -> (low, high, low is excluded, why): every number a request may set, and the reason for its bounds.
RANGES: dict[str, tuple[float, float, bool, str]] = {
    "n_epochs": (1, 50, False, "more epochs only memorise the training file"),
    "batch_size": (1, 256, False, "OpenAI's largest batch size"),
    "learning_rate_multiplier": (0, 10, True, "10x tunelab's base rate (2e-4 LoRA, 2e-5 full) already diverges"),
    "beta": (0, 10, True, "DPO's beta is usually 0.01-0.5; larger values ignore the preference data"),
    "lora_r": (1, 1024, False, "a rank past 1024 is larger than the layers it adapts"),
    "lora_alpha": (0, 4096, True, "alpha/r scales the update; past 4096 it swamps the base weights"),
    "lora_dropout": (0, 0.9, False, "a dropout near 1 drops the whole update"),
    "max_seq_len": (8, 1_048_576, False, "and at most the base model's context"),
    "max_steps": (1, 1_000_000, False, "a job of a million optimizer steps is a mistake"),
    "save_every": (1, 1_000_000, False, "steps between checkpoints"),
    "eval_every": (1, 1_000_000, False, "steps between validation runs"),
    "micro_batch_size": (1, 256, False, "the largest batch_size"),
    "learning_rate": (0, MAX_LR, True, "rates past 1e-2 diverge for every kind of fine-tuning"),
    "warmup_ratio": (0, 0.9, False, "the share of steps spent warming up"),
    "eval_interval": (1, 1_000_000, False, "training steps between validation runs"),
    "eval_samples": (1, 1, False, "each validation prompt is sampled once here"),
    "compute_multiplier": (0, 8, True, "x4 completions per prompt (GRPO's group); past 8 (32 per prompt) a step "
                           "is mostly sampling"),
    "max_new_tokens": (1, 4096, False, "tokens sampled per completion in reinforcement jobs"),
    "temperature": (0, 2, True, "sampling temperature of the rollouts"),
    "kl_coef": (0, 10, False, "the KL penalty against the base model"),
    "grader_timeout_s": (0, 600, True, "seconds one python grader call may take"),
}


def _in_range(v: Any, info: ValidationInfo) -> Any:
    bounds = RANGES.get(info.field_name or "")
    if bounds is None or v is None or isinstance(v, str):
        return v
    lo, hi, lo_open, why = bounds
    if not math.isfinite(v) or v > hi or (v <= lo if lo_open else v < lo):
        shown = f"{'(' if lo_open else '['}{lo:g}, {hi:g}]"
        raise ValueError(f"must be in {shown}: {why}; got {v!r}")
    return v


class _Req(BaseModel):
    # Strict: no bools for numbers, no strings for bools or numbers (`n_epochs: true` is refused, not 1).
    model_config = ConfigDict(extra="forbid", strict=True)

    _range = field_validator("*")(_in_range)


class Hyperparameters(_Req):
    n_epochs: int | Auto | None = None
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None
    beta: float | Auto | None = None  # dpo only


class _MethodHyper(_Req):
    hyperparameters: Hyperparameters | None = None


class ReinforcementHyperparameters(_Req):
    """OpenAI's reinforcement hyperparameters. eval_samples other than 1 and reasoning_effort other than
    "default" are refused (build_config says why); the others are honoured."""

    n_epochs: int | Auto | None = None
    batch_size: int | Auto | None = None
    learning_rate_multiplier: float | Auto | None = None
    eval_interval: int | Auto | None = None
    eval_samples: int | Auto | None = None
    compute_multiplier: float | Auto | None = None
    reasoning_effort: Literal["default", "low", "medium", "high"] | None = None


class Reinforcement(_Req):
    grader: dict[str, Any]
    hyperparameters: ReinforcementHyperparameters | None = None


class Method(_Req):
    type: Literal["supervised", "dpo", "reinforcement"]
    supervised: _MethodHyper | None = None
    dpo: _MethodHyper | None = None
    reinforcement: Reinforcement | None = None


class TunelabOptions(_Req):
    """tunelab's own knobs, beyond OpenAI's. Every field is optional; unset ones keep tunelab's defaults."""

    finetune: Literal["lora", "qlora", "dora", "full"] | None = None
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None
    target_modules: list[str] | Literal["all-linear"] | None = Field(None, max_length=64)
    max_seq_len: int | None = None
    max_steps: int | None = None
    save_every: int | None = None
    eval_every: int | None = None
    micro_batch_size: int | None = None
    learning_rate: float | None = None
    """Absolute base learning rate (the multiplier still applies)."""
    warmup_ratio: float | None = None
    schedule: Literal["cosine", "linear", "constant"] | None = None
    packing: bool | None = None
    train_on: Literal["assistant", "all", "last_assistant"] | None = None
    gradient_checkpointing: bool | None = None
    early_stopping: bool | None = None
    max_new_tokens: int | None = None
    """Reinforcement jobs: tokens sampled per completion (default 64)."""
    temperature: float | None = None
    """Reinforcement jobs: the rollouts' sampling temperature (default 1.0)."""
    kl_coef: float | None = None
    """Reinforcement jobs: GRPO's KL penalty against the base model (default 0.04)."""
    grader_timeout_s: float | None = None
    """Reinforcement jobs: seconds one python grader call may take (default 10)."""

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v: Any) -> Any:
        if isinstance(v, list):
            if not v:
                raise ValueError("give at least one module name, or 'all-linear'")
            for name in v:
                if not name or len(name) > 200 or not set(name) <= MODULE_CHARS or ".." in name:
                    raise ValueError(f"{name[:200]!r} is not a module name (letters, digits, '_' and '.')")
        return v


class JobCreate(_Req):
    model: str = Field(min_length=1, max_length=512)
    training_file: str = Field(min_length=1, max_length=64)
    validation_file: str | None = Field(None, min_length=1, max_length=64)
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
        # It becomes part of a model name (and of nothing on disk): ASCII only, no '..', no ':' separators.
        if v is not None and (not v or not set(v) <= SUFFIX_CHARS or ".." in v):
            raise ValueError("use ASCII letters, digits, '-', '_' and '.' only (no '..')")
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
    inner = section.hyperparameters if isinstance(section, _MethodHyper | Reinforcement) else None
    merged = top.model_dump(exclude_none=True)
    if inner is not None:  # reinforcement's own ones are read by build_config
        merged.update(inner.model_dump(exclude_none=True, include=set(Hyperparameters.model_fields)))
    return Hyperparameters.model_validate(merged)


def tunelab_options(req: JobCreate) -> TunelabOptions:
    """Options from `metadata` keys `tunelab.<name>` and from `extra_body={"tunelab": {...}}` (which wins)."""
    raw: dict[str, Any] = {}
    for k, v in (req.metadata or {}).items():
        if k.startswith("tunelab."):
            raw[k.removeprefix("tunelab.")] = _scalar(v)
    if req.tunelab is not None:
        raw.update(req.tunelab.model_dump(exclude_none=True))
    try:
        return TunelabOptions.model_validate(raw)
    except ValidationError as e:
        err = e.errors()[0]
        name = ".".join(str(p) for p in err["loc"][:1])  # the option, not pydantic's union branch
        msg = "unknown tunelab option" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise OptionError(f"tunelab option {name!r}: {msg}", param=f"tunelab.{name}") from None


def _scalar(text: str) -> Any:
    """A metadata value as JSON (1e-4, true, 8), else YAML (a flow list `[q_proj, v_proj]`), else the string.
    YAML 1.1's yes/no/on/off stay strings, so the strict check refuses them as booleans."""
    if text == "":
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        return text
    return text if isinstance(value, bool) or value is None else value


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
    if base_lr * mult > MAX_LR:
        raise OptionError(f"the learning rate comes to {base_lr * mult:g} (base {base_lr:g} x multiplier {mult:g}), "
                          f"above {MAX_LR:g}, where every kind of fine-tuning diverges",
                          param="hyperparameters.learning_rate_multiplier")
    _set(raw, "train.lr", base_lr * mult)
    if req.seed is not None:
        _set(raw, "train.seed", req.seed)
    if mtype == "dpo":
        raw["method"] = "dpo"
        _set(raw, "dpo.beta", 0.1 if hp.beta in (None, "auto") else float(hp.beta))  # type: ignore[arg-type]
    elif mtype == "reinforcement":
        _reinforcement(raw, req, opts, has_valid=bool(valid_path))
    for name in RL_OPTIONS:
        if mtype != "reinforcement" and getattr(opts, name) is not None:
            raise OptionError(f"tunelab option {name!r} applies to reinforcement jobs only", param=f"tunelab.{name}")
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
    if mtype == "reinforcement":
        assert cfg.grpo is not None
        resolved.update(eval_interval=cfg.train.eval_every or None, eval_samples=1,
                        compute_multiplier=cfg.grpo.group_size / GROUP_PER_COMPUTE, reasoning_effort="default")
    return cfg, resolved


# ---------------------------------------------------------------------------------------------- reinforcement
GROUP_PER_COMPUTE = 4  # completions per prompt at compute_multiplier 1
RL_OPTIONS = ("max_new_tokens", "temperature", "kl_coef", "grader_timeout_s")


def _reinforcement(raw: dict[str, Any], req: JobCreate, opts: TunelabOptions, *, has_valid: bool) -> None:
    """OpenAI's reinforcement method as tunelab's GRPO: the grader is the reward, compute_multiplier scales the
    group of completions per prompt, eval_interval is the validation interval."""
    from tunelab.graders import GraderError, parse_grader

    rft = req.method.reinforcement if req.method else None
    if rft is None:
        raise OptionError("method.reinforcement: is required for method type 'reinforcement' (with a `grader`)",
                          param="method.reinforcement")
    try:
        parse_grader(rft.grader, "method.reinforcement.grader")
    except GraderError as e:
        raise OptionError(e.message, param=e.param or "method.reinforcement.grader") from None
    hp = rft.hyperparameters or ReinforcementHyperparameters()
    if hp.reasoning_effort not in (None, "default"):
        raise OptionError(f"method.reinforcement.hyperparameters.reasoning_effort: {hp.reasoning_effort!r} is not "
                          "supported: the models this server fine-tunes are not reasoning models (use 'default')",
                          param="method.reinforcement.hyperparameters.reasoning_effort")
    cm = 1.0 if hp.compute_multiplier in (None, "auto") else float(hp.compute_multiplier)  # type: ignore[arg-type]
    grpo: dict[str, Any] = {"group_size": max(2, min(32, round(GROUP_PER_COMPUTE * cm))), "grader": rft.grader,
                            "generation": {"max_new_tokens": opts.max_new_tokens or 64,
                                           "temperature": opts.temperature or 1.0}}
    if opts.kl_coef is not None:
        grpo["kl_coef"] = opts.kl_coef
    if opts.grader_timeout_s is not None:
        grpo["grader_timeout_s"] = opts.grader_timeout_s
    raw["method"], raw["grpo"] = "grpo", grpo
    if has_valid and hp.eval_interval not in (None, "auto"):
        _set(raw, "train.eval_every", int(hp.eval_interval))  # type: ignore[arg-type]


def check_reinforcement(req: JobCreate, served_names: tuple[str, ...]) -> None:
    """What the request schema cannot know: a model grader's `model` must be this server's base unless the
    server names another endpoint for graders (TUNELAB_GRADER_BASE_URL)."""
    from tunelab.graders import GraderError, parse_grader
    from tunelab.graders.model import ENV_URL
    from tunelab.graders.spec import LabelModel, Multi, ScoreModel

    rft = req.method.reinforcement if req.method and req.method.type == "reinforcement" else None
    if rft is None or os.environ.get(ENV_URL):
        return
    try:
        spec = parse_grader(rft.grader, "method.reinforcement.grader")
    except GraderError:
        return  # build_config reports it

    def walk(s: Any, path: str) -> None:
        if isinstance(s, ScoreModel | LabelModel) and s.model not in served_names:
            raise OptionError(f"{path}.model: {s.model!r} is not served here; model graders use this server's "
                              f"base ({', '.join(served_names)}) unless the server sets TUNELAB_GRADER_BASE_URL",
                              param=f"{path}.model")
        if isinstance(s, Multi):
            for k, sub in s.parsed.items():
                walk(sub, f"{path}.graders.{k}")

    walk(spec, "method.reinforcement.grader")


def module_suffixes(layer_names: list[str] | tuple[str, ...] | set[str]) -> frozenset[str]:
    """Every name `target_modules` may use for these layers: PEFT matches a name against a layer's full
    name or any dotted tail of it (`q_proj`, `self_attn.q_proj`, `model.layers.0.self_attn.q_proj`)."""
    out: set[str] = set()
    for full in layer_names:
        parts = full.split(".")
        out.update(".".join(parts[i:]) for i in range(len(parts)))
    return frozenset(out)


def check_against_model(opts: TunelabOptions, module_names: frozenset[str], context: int | None) -> None:
    """What the request schema cannot know: whether the options fit the base model being fine-tuned."""
    if isinstance(opts.target_modules, list) and module_names:
        unknown = [m for m in opts.target_modules if m not in module_names]
        if unknown:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in module_names if not n[:1].isdigit()})
            raise OptionError(f"tunelab option 'target_modules': the base model has no module {unknown[0]!r}; "
                              f"it has {', '.join(leaves[:24])}{' ...' if len(leaves) > 24 else ''} "
                              "(or use 'all-linear')", param="tunelab.target_modules")
    if opts.max_seq_len is not None and context and opts.max_seq_len > context:
        raise OptionError(f"tunelab option 'max_seq_len': {opts.max_seq_len} is longer than the base model's "
                          f"context of {context} tokens", param="tunelab.max_seq_len")


def total_steps(cfg: RunConfig, n_examples: int) -> int:
    per_epoch = max(1, math.ceil(n_examples / (cfg.train.batch_size * cfg.train.grad_accum)))
    return cfg.train.max_steps or max(1, math.ceil(cfg.train.epochs * per_epoch))
