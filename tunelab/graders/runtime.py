"""A grader spec made runnable: `Grader.grade(outputs, items) -> (scores, per-grader scores)`.

Batch-shaped because training grades a whole rollout at once: a model grader sends every prompt of the batch
to its chat backend in one call, a python grader keeps one sandbox worker for its whole life. A multi grader
grades with each of its graders, then combines their scores with its formula; its per-grader scores are
reported under the graders' keys (`multi.graders`), a single grader's under its name.
"""

from __future__ import annotations

from typing import Any

from tunelab.graders import formula, text
from tunelab.graders.model import ChatFn, instruction, parse_label, parse_score
from tunelab.graders.sandbox import PythonSandbox
from tunelab.graders.spec import (
    GraderError,
    GraderSpec,
    LabelModel,
    Multi,
    Python,
    ScoreModel,
    StringCheck,
    TextSimilarity,
)
from tunelab.graders.template import make_sample, render


class Grader:
    def __init__(self, spec: GraderSpec, *, chat: ChatFn | None = None, timeout_s: float = 10.0,
                 memory_mb: int = 1024) -> None:
        self.spec, self.chat, self.timeout_s, self.memory_mb = spec, chat, timeout_s, memory_mb
        self._sandboxes: dict[int, PythonSandbox] = {}
        self._formulas: dict[int, Any] = {}

    def close(self) -> None:
        for s in self._sandboxes.values():
            s.close()
        self._sandboxes.clear()

    def __enter__(self) -> Grader:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    def grade(self, outputs: list[str], items: list[dict[str, Any]]) -> tuple[list[float], dict[str, list[float]]]:
        """Scores of each output (with its item), and each named sub-grader's scores for a multi grader."""
        samples = [make_sample(o) for o in outputs]
        parts: dict[str, list[float]] = {}
        scores = self._grade(self.spec, samples, items, parts)
        return scores, parts

    def _grade(self, spec: GraderSpec, samples: list[dict[str, Any]], items: list[dict[str, Any]],
               parts: dict[str, list[float]]) -> list[float]:
        try:
            if isinstance(spec, StringCheck):
                return [text.string_check(render(spec.input, s, i), render(spec.reference, s, i), spec.operation)
                        for s, i in zip(samples, items, strict=True)]
            if isinstance(spec, TextSimilarity):
                return [text.similarity(render(spec.input, s, i), render(spec.reference, s, i),
                                        spec.evaluation_metric) for s, i in zip(samples, items, strict=True)]
        except ValueError as e:
            raise GraderError(f"{spec.type} grader {spec.name!r}: {e}") from None
        if isinstance(spec, Python):
            box = self._sandboxes.get(id(spec))
            if box is None:
                box = self._sandboxes[id(spec)] = PythonSandbox(spec.name, spec.source, timeout_s=self.timeout_s,
                                                                memory_mb=self.memory_mb)
            return [box.grade(s, i) for s, i in zip(samples, items, strict=True)]
        if isinstance(spec, ScoreModel | LabelModel):
            return self._model(spec, samples, items)
        assert isinstance(spec, Multi)
        sub = {k: self._grade(g, samples, items, parts) for k, g in spec.parsed.items()}
        for k, v in sub.items():
            parts[k] = v
        tree = self._formulas.get(id(spec))
        if tree is None:
            tree = self._formulas[id(spec)] = formula.parse_formula(spec.calculate_output, set(spec.parsed))
        try:
            return [formula.evaluate(tree, {k: v[j] for k, v in sub.items()}) for j in range(len(samples))]
        except ValueError as e:
            raise GraderError(f"multi grader {spec.name!r}: {e}") from None

    def _model(self, spec: ScoreModel | LabelModel, samples: list[dict[str, Any]],
               items: list[dict[str, Any]]) -> list[float]:
        if self.chat is None:
            raise GraderError(f"{spec.type} grader {spec.name!r}: no chat model is available to grade with")
        try:
            batch = [[{"role": m.role, "content": render(m.text, s, i)} for m in spec.input]
                     + [{"role": "system", "content": instruction(spec)}] for s, i in zip(samples, items, strict=True)]
        except ValueError as e:
            raise GraderError(f"{spec.type} grader {spec.name!r}: {e}") from None
        answers = self.chat(spec.model, batch, spec.sampling_params)
        if isinstance(spec, ScoreModel):
            lo, hi = spec.bounds
            return [parse_score(a, lo, hi) for a in answers]
        passing = set(spec.passing_labels)
        return [float(parse_label(a, spec.labels) in passing) for a in answers]
