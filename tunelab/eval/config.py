"""The `eval:` configuration section: which metrics, the JSON schema, user metrics, fixed generation settings
and the judge. Imports only pydantic, so `tunelab.config` can use `EvalConfig` as its `eval:` section.

A run config's `eval:` section holds these keys; `tunelab eval --eval-config FILE` can also take them from a
separate YAML file (a mapping of these keys, or a mapping with an `eval:` key).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tunelab.errors import ConfigError, format_validation_error, read_yaml

DEFAULT_RUBRIC = (
    "Judge which answer better fulfils the user's request: correct, complete, following any requested "
    "format exactly, and concise. Do not prefer an answer because it is longer or because of its position."
)

DEFAULT_JUDGE_PROMPT = """You are an impartial judge comparing two AI assistant answers to the same request.

Rubric:
{rubric}

[Request]
{prompt}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Which answer is better? Reply with exactly one word: A, B, or TIE."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GenerationSettings(_Strict):
    """Fixed, recorded decoding: greedy, so the same model and prompts always give the same outputs."""

    max_new_tokens: int = Field(default=256, ge=1)
    batch_size: int = Field(default=8, ge=1)
    repetition_penalty: float = Field(default=1.0, gt=0)


class JudgeSettings(_Strict):
    base_url: str | None = None
    """Any OpenAI-compatible endpoint, e.g. http://127.0.0.1:8000/v1 (tunelab serve) or a hosted API."""
    model: str | None = None
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the key (the key itself never goes in a config)."""
    rubric: str = DEFAULT_RUBRIC
    prompt: str = DEFAULT_JUDGE_PROMPT
    """Template with {rubric}, {prompt}, {answer_a}, {answer_b}."""
    both_orders: bool = True
    """Ask twice with the answers swapped: measures position bias; disagreeing verdicts count as a tie."""
    seed: int = 0
    temperature: float = Field(default=0.0, ge=0)
    max_tokens: int = Field(default=8, ge=1)
    timeout_s: float = Field(default=60.0, gt=0)
    concurrency: int = Field(default=4, ge=1)


class EvalConfig(_Strict):
    baseline: bool = True
    """Training: evaluate the base model on the validation set before the first step."""
    metrics: list[str] = ["exact_match", "json_valid", "schema", "field_accuracy", "rouge_l", "chrf", "bleu"]
    """Built-in: exact_match, json_valid, schema, field_accuracy, rouge_l, chrf, bleu, contains_answer.
    `schema` is skipped unless json_schema is set."""
    json_schema: dict[str, Any] | str | None = None
    """Inline JSON schema, or a path to a .json/.yaml file holding one (relative to the config file)."""
    fields: list[str] | None = None
    """Fields scored by field_accuracy; default: every key of each reference object."""
    lenient_json: bool = False
    """Accept JSON wrapped in a ``` fence. Off by default: the task is usually *strict* JSON."""
    user_metrics: list[str] = []
    """Python functions (prompt, output, reference) -> float: 'pkg.module:function' or 'file.py:function'."""
    system_prompt: str | None = None
    """System prompt given to the base model only (e.g. format instructions the fine-tuned model no longer needs)."""
    max_examples: int | None = Field(default=None, ge=1)
    generation: GenerationSettings = GenerationSettings()
    forgetting: bool = True
    """Also score base and fine-tuned models on the bundled general instruction set."""
    general_data: str | None = None
    """A different general set for forgetting (messages JSONL, answers checked with contains_answer)."""
    general_max_examples: int | None = Field(default=60, ge=1)
    general_max_new_tokens: int = Field(default=48, ge=1)
    samples_in_report: int = Field(default=8, ge=0)
    judge: JudgeSettings = JudgeSettings()

    def resolved_schema(self, base_dir: Path | None = None) -> dict[str, Any] | None:
        if self.json_schema is None or isinstance(self.json_schema, dict):
            return self.json_schema
        p = Path(self.json_schema).expanduser()
        if not p.is_absolute() and base_dir is not None:
            p = base_dir / p
        if not p.is_file():
            raise ConfigError(f"eval.json_schema: file {p} not found")
        try:
            text = p.read_text(encoding="utf-8")
            data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
        except (ValueError, yaml.YAMLError) as e:
            raise ConfigError(f"eval.json_schema: {p} is not valid JSON/YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"eval.json_schema: {p} must hold a JSON object")
        return data


def eval_config_from_dict(raw: Any, source: str = "eval") -> EvalConfig:
    if raw is None:
        return EvalConfig()
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the eval section must be a mapping")
    try:
        return EvalConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, source, EvalConfig, "eval.", "eval configuration")) from None


def load_eval_config(path: str | Path) -> EvalConfig:
    """An eval config YAML: the keys of `eval:` at top level, or a whole config with an `eval:` section."""
    p = Path(path)
    raw = read_yaml(p, "eval config file")
    if isinstance(raw, dict) and ("eval" in raw or "data" in raw or "model" in raw):
        raw = raw.get("eval") or {}  # a whole run config: only its eval section matters here
    return eval_config_from_dict(raw, str(p))
