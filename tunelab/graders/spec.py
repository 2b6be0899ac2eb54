"""OpenAI's grader objects (the `grader` of `method.reinforcement`, and of `/alpha/graders/*`), as typed models.

Field names follow OpenAI's API reference and openai-python's `types/graders`: string_check (input, reference,
operation eq|ne|like|ilike), text_similarity (input, reference, evaluation_metric, pass_threshold), python
(source, image_tag), score_model (model, input messages, range, sampling_params), label_model (model, input,
labels, passing_labels) and multi (graders, calculate_output). `parse_grader` dispatches on `type` by hand so a
bad field is reported with its full dotted path (`method.reinforcement.grader.operation`,
`...grader.graders.accuracy.source`), never with pydantic's union-branch tags.
"""

from __future__ import annotations

import ast
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tunelab.errors import TunelabError

GRADER_TYPES = ("string_check", "text_similarity", "python", "score_model", "label_model", "multi")
SIMILARITY_METRICS = ("fuzzy_match", "bleu", "gleu", "meteor", "cosine", "rouge_1", "rouge_2", "rouge_3", "rouge_4",
                      "rouge_5", "rouge_l")
UNSUPPORTED_METRICS = {"cosine": "it needs an embeddings model (OpenAI's text-embedding-3-large); this server has none"}
MAX_SOURCE = 256 * 1024  # OpenAI's limit on a python grader's source
MAX_TEMPLATE = 64 * 1024
MAX_DEPTH = 3  # multi graders inside multi graders


class GraderError(TunelabError):
    """A grader that cannot be built or that failed while scoring; `param` is the request field at fault."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class _G(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    name: str = Field(min_length=1, max_length=256)


Template = Annotated[str, Field(max_length=MAX_TEMPLATE)]


class StringCheck(_G):
    type: Literal["string_check"]
    input: Template
    reference: Template
    operation: Literal["eq", "ne", "like", "ilike"]


class TextSimilarity(_G):
    type: Literal["text_similarity"]
    input: Template
    reference: Template
    evaluation_metric: Literal[SIMILARITY_METRICS]  # type: ignore[valid-type]
    pass_threshold: float | None = Field(None, ge=0, le=1)
    """OpenAI's evals field; a reinforcement job trains on the score itself, so it is only reported."""

    @field_validator("evaluation_metric")
    @classmethod
    def _supported(cls, v: str) -> str:
        if v in UNSUPPORTED_METRICS:
            raise ValueError(f"{v!r} is not supported here: {UNSUPPORTED_METRICS[v]}")
        return v


class Python(_G):
    type: Literal["python"]
    source: str = Field(min_length=1, max_length=MAX_SOURCE)
    image_tag: str | None = None
    """OpenAI's sandbox image; ignored here (the server's own interpreter runs the code)."""

    @field_validator("source")
    @classmethod
    def _defines_grade(cls, v: str) -> str:
        try:
            tree = ast.parse(v)
        except SyntaxError as e:
            raise ValueError(f"the source does not parse: {e.msg} (line {e.lineno})") from None
        fn = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "grade"), None)
        if fn is None:
            raise ValueError("the source must define `def grade(sample, item) -> float` at top level")
        if len(fn.args.args) + len(fn.args.posonlyargs) < 2 and fn.args.vararg is None:
            raise ValueError("`grade` must take two arguments: (sample, item)")
        return v


class InputText(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    type: Literal["input_text", "output_text"]
    text: Template


class InputMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    role: Literal["user", "assistant", "system", "developer"]
    content: Template | InputText
    type: Literal["message"] | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else self.content.text


class SamplingParams(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    seed: int | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    max_completions_tokens: int | None = Field(None, ge=1, le=4096)
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = None
    """Passed on to the endpoint; the served base ignores it (it is not a reasoning model)."""


class _ModelGrader(_G):
    model: str = Field(min_length=1, max_length=512)
    input: list[InputMessage] = Field(min_length=1, max_length=64)
    sampling_params: SamplingParams | None = None


class ScoreModel(_ModelGrader):
    type: Literal["score_model"]
    range: list[float] | None = Field(None, min_length=2, max_length=2)

    @field_validator("range")
    @classmethod
    def _ordered(cls, v: list[float] | None) -> list[float] | None:
        if v is not None and not v[0] < v[1]:
            raise ValueError(f"must be [low, high] with low < high; got {v}")
        return v

    @property
    def bounds(self) -> tuple[float, float]:
        return (self.range[0], self.range[1]) if self.range else (0.0, 1.0)


class LabelModel(_ModelGrader):
    type: Literal["label_model"]
    labels: list[Annotated[str, Field(min_length=1, max_length=256)]] = Field(min_length=2, max_length=64)
    passing_labels: list[str] = Field(min_length=1, max_length=64)

    @model_validator(mode="after")
    def _subset(self) -> LabelModel:
        unknown = [p for p in self.passing_labels if p not in self.labels]
        if unknown:
            raise ValueError(f"passing_labels {unknown} are not among labels {self.labels}")
        return self


class Multi(_G):
    type: Literal["multi"]
    graders: dict[str, Any]
    calculate_output: str = Field(min_length=1, max_length=4096)
    parsed: dict[str, GraderSpec] = Field(default_factory=dict, exclude=True)


GraderSpec = StringCheck | TextSimilarity | Python | ScoreModel | LabelModel | Multi
_BY_TYPE: dict[str, type[BaseModel]] = {"string_check": StringCheck, "text_similarity": TextSimilarity,
                                        "python": Python, "score_model": ScoreModel, "label_model": LabelModel,
                                        "multi": Multi}


def _first_error(e: ValidationError, path: str) -> GraderError:
    err = e.errors()[0]
    loc = ".".join(str(p) for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p in
                                                                                ("str", "InputText"))))
    param = f"{path}.{loc}" if loc else path
    if err["type"] == "extra_forbidden":
        msg = "unknown field"
    elif err["type"] == "missing":
        msg = "is required"
    else:
        msg = str(err["msg"]).removeprefix("Value error, ")
    return GraderError(f"{param}: {msg}", param=param)


def parse_grader(raw: Any, path: str = "grader", depth: int = 0) -> GraderSpec:
    """A validated grader, or a GraderError naming the field (`path` is where `raw` sits in the request)."""
    from tunelab.graders.formula import parse_formula

    if not isinstance(raw, dict):
        raise GraderError(f"{path}: must be an object with a `type` ({', '.join(GRADER_TYPES)})", param=path)
    kind = raw.get("type")
    if kind not in _BY_TYPE:
        shown = f"{kind!r} is not a grader type" if kind is not None else "is required"
        raise GraderError(f"{path}.type: {shown} (one of {', '.join(GRADER_TYPES)})", param=f"{path}.type")
    try:
        spec: Any = _BY_TYPE[kind].model_validate(raw)
    except ValidationError as e:
        raise _first_error(e, path) from None
    if isinstance(spec, Multi):
        if depth >= MAX_DEPTH:
            raise GraderError(f"{path}: multi graders nest at most {MAX_DEPTH} deep", param=path)
        if not spec.graders:
            raise GraderError(f"{path}.graders: give at least one grader", param=f"{path}.graders")
        parsed: dict[str, GraderSpec] = {}
        for key, sub in spec.graders.items():
            if not key.isidentifier():
                raise GraderError(f"{path}.graders: {key!r} is not a name a formula can use (letters, digits, '_')",
                                  param=f"{path}.graders.{key}")
            parsed[key] = parse_grader(sub, f"{path}.graders.{key}", depth + 1)
        try:
            parse_formula(spec.calculate_output, set(parsed))
        except ValueError as e:
            raise GraderError(f"{path}.calculate_output: {e}", param=f"{path}.calculate_output") from None
        spec = spec.model_copy(update={"parsed": parsed})
    _check_templates(spec, path)
    return spec  # type: ignore[no-any-return]


def _check_templates(spec: Any, path: str) -> None:
    from tunelab.graders.template import references

    fields = [(f, getattr(spec, f)) for f in ("input", "reference") if isinstance(getattr(spec, f, None), str)]
    if isinstance(spec, ScoreModel | LabelModel):
        fields = [(f"input.{i}.content", m.text) for i, m in enumerate(spec.input)]
    for name, text in fields:
        try:
            references(text)
        except ValueError as e:
            raise GraderError(f"{path}.{name}: {e}", param=f"{path}.{name}") from None


def item_fields(spec: GraderSpec) -> set[tuple[str, ...]]:
    """The `item.*` paths a grader's templates read (each must resolve in every row of the data)."""
    from tunelab.graders.template import references

    out: set[tuple[str, ...]] = set()
    texts: list[str] = []
    if isinstance(spec, StringCheck | TextSimilarity):
        texts = [spec.input, spec.reference]
    elif isinstance(spec, ScoreModel | LabelModel):
        texts = [m.text for m in spec.input]
    elif isinstance(spec, Multi):
        for sub in spec.parsed.values():
            out |= item_fields(sub)
    for t in texts:
        out |= {ref[1:] for ref in references(t) if ref[0] == "item"}
    return out


def names(spec: GraderSpec) -> list[str]:
    """Every grader's name, outermost first (for per-grader metrics)."""
    out = [spec.name]
    if isinstance(spec, Multi):
        for sub in spec.parsed.values():
            out += names(sub)
    return out


Multi.model_rebuild()
