"""Pure evaluation metrics: each takes model output text and a reference and returns a number.

Per-example metrics share the signature `(prompt, output, reference) -> float | None` (None = does not apply,
e.g. field accuracy when the reference is not a JSON object) so built-in and user metrics are scored the same
way. Corpus metrics (BLEU, chrF) are computed over all examples at once, as sacrebleu intends. Nothing here
loads a model or touches the disk except `load_user_metric`.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import math
import re
import sys
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

from tunelab.errors import ConfigError

MetricFn = Callable[[str, str, str], float | None]

_FENCE = re.compile(r"^\s*```[a-zA-Z0-9_-]*\s*\n(.*?)\n?```\s*$", re.DOTALL)


def normalize_text(s: str) -> str:
    """Collapse runs of whitespace and strip: formatting noise that no metric should punish."""
    return " ".join(s.split())


def exact_match(output: str, reference: str) -> float:
    """1.0 when output and reference are equal after whitespace normalization (case-sensitive)."""
    return float(normalize_text(output) == normalize_text(reference))


def parse_json(text: str, lenient: bool = False) -> tuple[bool, Any]:
    """(ok, value). Strict: the whole output must be one JSON value. Lenient also accepts a ```json fence."""
    s = text.strip()
    if lenient:
        m = _FENCE.match(s)
        if m:
            s = m.group(1).strip()
    try:
        return True, json.loads(s)
    except (ValueError, RecursionError):
        return False, None


def json_valid(output: str, lenient: bool = False) -> float:
    return float(parse_json(output, lenient)[0])


@lru_cache(maxsize=16)
def _validator(schema_text: str) -> Any:
    import jsonschema

    schema = json.loads(schema_text)
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def check_schema(schema: dict[str, Any]) -> None:
    """Raise ConfigError when `schema` is not a valid JSON schema (caught at config time, not mid-eval)."""
    import jsonschema

    try:
        _validator(json.dumps(schema, sort_keys=True))
    except jsonschema.SchemaError as e:
        raise ConfigError(f"eval.json_schema: not a valid JSON schema: {e.message}") from None


def schema_conforms(output: str, schema: dict[str, Any], lenient: bool = False) -> float:
    """1.0 when the output parses as JSON and validates against `schema`; invalid JSON scores 0."""
    ok, value = parse_json(output, lenient)
    if not ok:
        return 0.0
    return float(_validator(json.dumps(schema, sort_keys=True)).is_valid(value))


def _norm_value(v: Any) -> Any:
    # Field values compare loosely on formatting: case, repeated whitespace, trailing punctuation, list order
    # (a set of codes is the same set in any order), int vs float.
    if isinstance(v, str):
        return normalize_text(v).casefold().rstrip(" .,;:")
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, int | float):
        return float(v)
    if isinstance(v, list):
        return sorted(json.dumps(_norm_value(x), sort_keys=True) for x in v)
    if isinstance(v, dict):
        return {str(k): _norm_value(x) for k, x in v.items()}
    return v


def field_matches(
    output: str, reference: str, fields: Sequence[str] | None = None, lenient: bool = False
) -> dict[str, bool] | None:
    """Per-field correctness of a JSON-object output against a JSON-object reference.

    Fields default to the reference's keys. None when the reference is not a JSON object (metric does not
    apply); every field is wrong when the output is not a JSON object.
    """
    ok, ref = parse_json(reference, lenient=True)
    if not ok or not isinstance(ref, dict):
        return None
    names = list(fields) if fields else list(ref)
    ok, out = parse_json(output, lenient)
    if not ok or not isinstance(out, dict):
        return {f: False for f in names}
    return {f: f in out and f in ref and _norm_value(out[f]) == _norm_value(ref[f]) for f in names}


def field_accuracy(
    output: str, reference: str, fields: Sequence[str] | None = None, lenient: bool = False
) -> float | None:
    m = field_matches(output, reference, fields, lenient)
    if m is None or not m:
        return None
    return sum(m.values()) / len(m)


@lru_cache(maxsize=1)
def _rouge() -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(output: str, reference: str) -> float:
    """ROUGE-L F-measure in [0, 1] (rouge-score's tokenizer: lower-cased alphanumeric tokens)."""
    if not output.strip() and not reference.strip():
        return 1.0
    return float(_rouge().score(reference, output)["rougeL"].fmeasure)


def chrf(output: str, reference: str) -> float:
    """Sentence chrF in [0, 100] (sacrebleu defaults: character 6-grams, beta 2)."""
    import sacrebleu

    return float(sacrebleu.sentence_chrf(output, [reference]).score)


def bleu(output: str, reference: str) -> float:
    """Sentence BLEU in [0, 100] with sacrebleu's exponential smoothing (short strings have few 4-grams)."""
    import sacrebleu

    return float(sacrebleu.sentence_bleu(output, [reference]).score)


def corpus_chrf(outputs: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_chrf(list(outputs), [list(references)]).score)


def corpus_bleu(outputs: Sequence[str], references: Sequence[str]) -> float:
    import sacrebleu

    return float(sacrebleu.corpus_bleu(list(outputs), [list(references)]).score)


def perplexity(loss: float) -> float:
    """exp(mean token cross-entropy in nats); inf rather than an overflow error for a diverged model."""
    if math.isnan(loss):
        return math.nan
    return math.exp(loss) if loss < 700 else math.inf


def contains_answer(output: str, reference: str) -> float:
    """1.0 when the reference appears in the output as a whole token sequence (not inside a longer word or
    number), ignoring case unless the reference is all uppercase: '42' matches 'The answer is 42.' but not
    '142'. Used by the general (forgetting) set, whose
    answers are short and checkable."""
    ref = normalize_text(reference)
    if not ref:
        return 0.0
    pat = r"(?<![\w])" + re.escape(ref) + r"(?![\w])"
    # Case matters only when the answer is itself about case (an all-uppercase rewrite); 'Paris' == 'paris'.
    flags = 0 if (ref.isupper() and any(c.isalpha() for c in ref)) else re.IGNORECASE
    return float(re.search(pat, normalize_text(output), flags) is not None)


# --- the registry the evaluation run uses -------------------------------------------------------------------

# Per-example metrics by config name. JSON metrics need options (schema, fields) and are bound in `build`.
SIMPLE: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "chrf": chrf,
    "bleu": bleu,
    "contains_answer": contains_answer,
}
JSON_METRICS = ("json_valid", "schema", "field_accuracy")
CORPUS: dict[str, Callable[[Sequence[str], Sequence[str]], float]] = {"chrf": corpus_chrf, "bleu": corpus_bleu}
BUILTIN = (*SIMPLE, *JSON_METRICS)


def _bind(name: str, schema: dict[str, Any] | None, fields: Sequence[str] | None, lenient: bool) -> MetricFn:
    def fn(_prompt: str, output: str, reference: str) -> float | None:
        if name in SIMPLE:
            return SIMPLE[name](output, reference)
        if name == "json_valid":
            return json_valid(output, lenient)
        if name == "schema":
            assert schema is not None
            return schema_conforms(output, schema, lenient)
        return field_accuracy(output, reference, fields, lenient)

    return fn


def build(
    names: Sequence[str],
    *,
    schema: dict[str, Any] | None = None,
    fields: Sequence[str] | None = None,
    lenient_json: bool = False,
) -> dict[str, MetricFn]:
    """Bind the configured metric names to `(prompt, output, reference) -> float | None` functions."""
    out: dict[str, MetricFn] = {}
    for name in names:
        if name == "schema":
            if schema is None:
                raise ConfigError("eval.metrics has 'schema' but eval.json_schema is not set")
            check_schema(schema)
        if name not in BUILTIN:
            raise ConfigError(f"eval.metrics: unknown metric {name!r} (built-in: {', '.join(BUILTIN)})")
        out[name] = _bind(name, schema, fields, lenient_json)
    return out


def load_user_metric(spec: str) -> MetricFn:
    """Load `(prompt, output, reference) -> float` from 'pkg.module:function', 'pkg.module.function' or
    'path/to/file.py:function'."""
    if ":" in spec:
        target, func = spec.rsplit(":", 1)
    elif "." in spec:
        target, func = spec.rsplit(".", 1)
    else:
        raise ConfigError(f"eval.user_metrics: {spec!r}: expected 'module:function' or 'file.py:function'")
    if target.endswith(".py"):
        path = Path(target).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.user_metrics: {spec!r}: file {path} not found")
        mod_name = f"tunelab_user_metric_{abs(hash(str(path.resolve())))}"
        loader_spec = importlib.util.spec_from_file_location(mod_name, path)
        if loader_spec is None or loader_spec.loader is None:
            raise ConfigError(f"eval.user_metrics: {spec!r}: cannot import {path}")
        module = importlib.util.module_from_spec(loader_spec)
        sys.modules[mod_name] = module
        try:
            loader_spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"eval.user_metrics: {spec!r}: importing {path} failed: {e}") from e
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as e:
            raise ConfigError(f"eval.user_metrics: {spec!r}: cannot import module {target!r}: {e}") from e
    fn = getattr(module, func, None)
    if not callable(fn):
        raise ConfigError(f"eval.user_metrics: {spec!r}: {target} has no function {func!r}")
    return fn  # type: ignore[no-any-return]


def user_metric_name(spec: str) -> str:
    return re.split(r"[:.]", spec)[-1]


def mean(values: Sequence[float | None]) -> float | None:
    """Mean over the examples where a metric applied (None = not applicable)."""
    xs = [float(v) for v in values if v is not None]
    return sum(xs) / len(xs) if xs else None
