"""Run configuration: one YAML file validated once into frozen, typed pydantic models.

`load_config(path, overrides)` is the only entry point. Unknown keys are errors that name the key and suggest
the nearest valid one; values are checked here, so nothing downstream ever sees an untyped dict.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunelab.data.toolkit.pipeline import PipelineConfig
from tunelab.errors import ConfigError, read_yaml
from tunelab.errors import format_validation_error as _format_error
from tunelab.eval.config import EvalConfig


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
    dropout: float = Field(0.0, ge=0, lt=1)
    """0 skips the dropout mask (PEFT uses nn.Identity); on the demo 0 and 0.05 scored the same (docs/benchmarks.md)."""
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
    answers: Literal["reference", "self"] = "reference"
    """`reference`: train on the file's own answers. `self`: replace them with the base model's greedy answers to
    the same prompts, generated once before step 1 and kept in the run folder (self-distillation replay: the
    mixed-in examples then hold the model to what it already does instead of teaching it new answers; answers cut
    by `max_new_tokens` are dropped). Chat (SFT) data only."""
    max_new_tokens: int = Field(128, ge=1)
    """Length limit for `answers: self`."""


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
    min_examples: int = Field(10, ge=1)
    """Refuse training files with fewer valid examples (OpenAI's minimum is 10)."""
    system_prompt: str | None = None
    """Prepended to every conversation that has no system message."""
    mix: DataMix | None = None
    pipeline: PipelineConfig | None = None
    """Data toolkit steps (dedup, scrub, filter, contamination) run by `tunelab data pipeline CONFIG`."""
    check_contamination: bool = True
    """Warn when validation/test examples overlap training ones (exact, n-gram or MinHash near-duplicates)."""


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
    loss_chunk: int = Field(256, ge=0)
    """SFT: the LM head and cross-entropy run this many positions at a time, so the (tokens x vocabulary) fp32
    logits never exist whole (same loss and gradients); 0 = all at once."""
    compile: bool = False
    """torch.compile each decoder layer (inductor; a C++ compiler on CPU). Pays on long runs: compiling costs a
    fixed time up front (docs/benchmarks.md)."""
    fsdp: bool = False
    """Full fine-tuning sharded across processes (FSDP2) when launched with several; ignored in one process."""
    optimizer: Literal["adamw", "paged_adamw"] = "adamw"
    """QLoRA defaults to paged_adamw (stated in the resolved config); it needs CUDA, elsewhere plain AdamW runs."""
    seed: int = 42
    log_every: int = Field(1, ge=1)
    eval_every: int | None = Field(None, ge=1)
    """Validation every N optimizer steps (and at the end); None = at each epoch end."""
    eval_max_examples: int | None = Field(None, ge=1)
    save_every: int | None = Field(None, ge=1)
    keep_checkpoints: int = Field(2, ge=1)
    early_stopping: bool = False
    patience: int = Field(3, ge=1)


# --- Preference and RL methods: one section per method, read only when `method` selects it. -------------


class DPOConfig(_Strict):
    beta: float = Field(default=0.1, gt=0)
    """KL strength: lower lets the policy move further from the reference."""
    loss_type: Literal["sigmoid", "ipo", "hinge"] = "sigmoid"
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)
    """Assumed fraction of flipped labels (conservative DPO); sigmoid loss only."""
    precompute_ref: bool = False
    """Compute reference log-probs once before training; the reference never runs during training."""


class ORPOConfig(_Strict):
    beta: float = Field(default=0.1, gt=0)
    """Weight of the odds-ratio term next to the SFT loss (the paper's lambda)."""


class SimPOConfig(_Strict):
    beta: float = Field(default=2.0, gt=0)
    gamma: float = Field(default=1.0, ge=0)
    """Target reward margin."""
    label_smoothing: float = Field(default=0.0, ge=0, lt=0.5)


class KTOConfig(_Strict):
    beta: float = Field(default=0.1, gt=0)
    desirable_weight: float = Field(default=1.0, gt=0)
    undesirable_weight: float = Field(default=1.0, gt=0)
    precompute_ref: bool = False


class RewardConfig(_Strict):
    center_coef: float | None = Field(default=None, ge=0)
    """Adds center_coef * (r_chosen + r_rejected)^2 to keep rewards near zero."""


class GenerationConfig(_Strict):
    max_new_tokens: int = Field(default=48, ge=1)
    temperature: float = Field(default=1.0, gt=0)
    top_k: int = Field(default=0, ge=0)


class PPOConfig(_Strict):
    reward_model: str
    """A run folder written by `method: reward`."""
    kl_coef: float = Field(default=0.05, ge=0)
    """beta in reward - beta * KL(pi || pi_ref), charged per token."""
    clip_eps: float = Field(default=0.2, gt=0, lt=1)
    value_clip: float = Field(default=0.2, gt=0)
    vf_coef: float = Field(default=0.1, ge=0)
    gamma: float = Field(default=1.0, gt=0, le=1)
    lam: float = Field(default=0.95, ge=0, le=1)
    ppo_epochs: int = Field(default=2, ge=1)
    """Passes over each step's rollouts (torchtune's ppo_epochs, TRL's num_ppo_epochs)."""
    num_minibatches: int = Field(default=1, ge=1)
    """Shuffled minibatches per pass, one optimizer step each: a step takes ppo_epochs * num_minibatches."""
    length_penalty: float = Field(default=0.0, ge=0)
    """Subtracted per character beyond target_length: a guard against reward hacking by verbosity."""
    target_length: int = Field(default=0, ge=0)
    generation: GenerationConfig = GenerationConfig()


class GRPOReward(_Strict):
    fn: Literal["json_valid", "json_schema", "regex", "length"]
    weight: float = 1.0
    json_schema: dict[str, Any] | None = None
    pattern: str | None = None
    max_chars: int | None = Field(default=None, ge=1)

    @model_validator(mode="after")
    def _needs(self) -> GRPOReward:
        import re

        if self.fn == "json_schema" and self.json_schema is None:
            raise ValueError("reward json_schema needs `json_schema`")
        if self.fn == "regex":
            if not self.pattern:
                raise ValueError("reward regex needs `pattern`")
            try:
                re.compile(self.pattern)
            except re.error as e:
                raise ValueError(f"reward regex: bad pattern {self.pattern!r}: {e}") from None
        if self.fn == "length" and self.max_chars is None:
            raise ValueError("reward length needs `max_chars`")
        return self


class GRPOConfig(_Strict):
    group_size: int = Field(default=4, ge=2)
    kl_coef: float = Field(default=0.04, ge=0)
    clip_eps: float = Field(default=0.2, gt=0, lt=1)
    num_iterations: int = Field(default=1, ge=1)
    """Passes over each step's rollouts (TRL's num_iterations, the paper's mu); above 1 the importance ratio
    against the sampling policy moves off 1 and clip_eps bounds it."""
    num_minibatches: int = Field(default=1, ge=1)
    """Shuffled minibatches per pass, one optimizer step each: a step takes num_iterations * num_minibatches."""
    rewards: list[GRPOReward] = []
    reward_model: str | None = None
    """A run folder written by `method: reward`, scored in addition to (or instead of) `rewards`."""
    grader: dict[str, Any] | None = None
    """An OpenAI grader object (tunelab/graders), scored in addition to (or instead of) the others; its `item`
    fields come from `<data file>.items.jsonl` next to each data file (one JSON object per line)."""
    grader_timeout_s: float = Field(default=10.0, gt=0, le=600)
    """Wall-clock seconds one python grader call may take before its process is killed."""
    grader_memory_mb: int = Field(default=1024, ge=64)
    """Address-space limit of a python grader's process."""
    generation: GenerationConfig = GenerationConfig()

    @model_validator(mode="after")
    def _some_reward(self) -> GRPOConfig:
        if not self.rewards and not self.reward_model and not self.grader:
            raise ValueError("grpo needs `rewards` (json_valid, json_schema, regex, length), a `reward_model` "
                             "or a `grader`")
        if self.grader is not None:
            from tunelab.graders import GraderError, parse_grader

            try:
                parse_grader(self.grader, "grpo.grader")
            except GraderError as e:
                raise ValueError(e.message) from None
        return self


METHOD_SECTIONS = {"dpo": "dpo", "orpo": "orpo", "simpo": "simpo", "kto": "kto", "reward": "reward", "ppo": "ppo",
                   "grpo": "grpo"}


def _check_method_section(cfg: RunConfig) -> None:
    """A non-default section for a method other than the selected one is almost always a mistake: say so.
    (Defaults are allowed so a dumped config, which lists every section, loads back.)"""
    for name in METHOD_SECTIONS:
        if name != cfg.method and getattr(cfg, name) != type(cfg).model_fields[name].default:
            raise ValueError(f"`{name}:` settings are given but method is {cfg.method!r}")
    if cfg.method in ("ppo", "grpo") and getattr(cfg, cfg.method) is None:
        raise ValueError(f"method {cfg.method!r} needs a `{cfg.method}:` section")
    rl = cfg.ppo if cfg.method == "ppo" else cfg.grpo if cfg.method == "grpo" else None
    if rl is not None:  # each minibatch is one optimizer step over part of the step's rollouts
        group = cfg.grpo.group_size if cfg.grpo is not None and cfg.method == "grpo" else 1
        rows = cfg.train.batch_size * cfg.train.grad_accum * group
        if rl.num_minibatches > rows:
            raise ValueError(
                f"{cfg.method}.num_minibatches={rl.num_minibatches} is more than the {rows} completions each process "
                "rolls out per step (train.batch_size * train.grad_accum" + (" * grpo.group_size)" if group > 1 else ")"))


# --- end of preference and RL methods ---------------------------------------------------------------------


class RunConfig(_Strict):
    model: ModelConfig = ModelConfig()
    method: Literal["sft", "reward", "ppo", "dpo", "orpo", "simpo", "kto", "grpo"] = "sft"
    dpo: DPOConfig = DPOConfig()
    orpo: ORPOConfig = ORPOConfig()
    simpo: SimPOConfig = SimPOConfig()
    kto: KTOConfig = KTOConfig()
    reward: RewardConfig = RewardConfig()
    ppo: PPOConfig | None = None
    grpo: GRPOConfig | None = None
    finetune: Literal["lora", "qlora", "dora", "adalora", "full"] = "lora"
    lora: LoraConfig = LoraConfig()
    data: DataConfig
    train: TrainConfig = TrainConfig()
    eval: EvalConfig = EvalConfig()
    """`baseline` (validation loss of the base model before step 1) is read by training; the rest by `tunelab eval`."""
    output_dir: str = "runs/run"
    track: list[Literal["tensorboard", "mlflow"]] = []
    mlflow_uri: str | None = None
    """MLflow tracking URI; default is a local SQLite store inside the run folder (RUN/mlflow.db)."""

    @model_validator(mode="before")
    @classmethod
    def _qlora_optimizer(cls, raw: Any) -> Any:
        # QLoRA's recipe pages the optimizer state; say so in the config rather than switch in the trainer.
        if isinstance(raw, dict) and raw.get("finetune") == "qlora":
            tr = raw.get("train")
            if tr is None or (isinstance(tr, dict) and "optimizer" not in tr):
                raw = {**raw, "train": {**(tr or {}), "optimizer": "paged_adamw"}}
        return raw

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.finetune == "adalora" and self.lora.target_r > self.lora.init_r:
            raise ValueError("lora.target_r must be <= lora.init_r for AdaLoRA")
        _check_method_section(self)
        if self.train.fsdp and self.finetune != "full":
            raise ValueError(f"train.fsdp shards full fine-tuning; with finetune: {self.finetune} the trainable "
                             "weights are small already: drop train.fsdp (several processes then run data-parallel)")
        if self.data.mix is not None and self.data.mix.answers == "self" and self.method != "sft":
            raise ValueError(f"data.mix.answers: self generates chat answers for SFT; method {self.method} trains "
                             "on other records: use answers: reference")
        if self.train.fsdp and self.method != "sft":
            raise ValueError(f"train.fsdp supports method sft; method {self.method} keeps a reference model or "
                             "extra heads that are not sharded")
        return self

    @property
    def uses_adapter(self) -> bool:
        return self.finetune != "full"


def format_validation_error(e: ValidationError, source: str) -> str:
    return _format_error(e, source, RunConfig)


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
    from tunelab.config_paths import check_inputs, resolve_paths

    p = Path(path)
    raw = resolve_paths(read_yaml(p, mapping=True), p.parent)  # the file's paths: relative to its folder
    sets = parse_overrides(overrides or [])
    for k, v in sets:
        _set_dotted(raw, k, v)
    resolve_paths(raw, Path.cwd(), only=[k for k, _ in sets])  # --set paths: relative to the current directory
    cfg = config_from_dict(raw, str(p))
    check_inputs(cfg, str(p), [k for k, _ in sets])
    return cfg


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
