"""The string and text-similarity graders' metrics: pure functions of (output, reference) -> score in [0, 1].

fuzzy_match is difflib's SequenceMatcher ratio (2 * matching characters / total characters); bleu is
sacrebleu's sentence BLEU / 100; gleu is NLTK's sentence GLEU; meteor is NLTK's METEOR with exact and Porter-stem
matches only (WordNet synonyms need a corpus download, which this server never does); rouge_1..5 and rouge_l are
rouge-score's F-measures (lower-cased alphanumeric tokens). The libraries are those the field uses; nothing here
re-implements a metric.
"""

from __future__ import annotations

import difflib
from functools import cache
from typing import Any


def string_check(output: str, reference: str, operation: str) -> float:
    """OpenAI's string_check: eq / ne exact (case-sensitive); like: the output contains the reference;
    ilike: the same, case-insensitively."""
    if operation == "eq":
        return float(output == reference)
    if operation == "ne":
        return float(output != reference)
    if operation == "like":
        return float(reference in output)
    if operation == "ilike":
        return float(reference.lower() in output.lower())
    raise ValueError(operation)


def fuzzy_match(output: str, reference: str) -> float:
    if not output and not reference:
        return 1.0
    return difflib.SequenceMatcher(None, output, reference, autojunk=False).ratio()


def bleu(output: str, reference: str) -> float:
    import sacrebleu

    return min(1.0, float(sacrebleu.sentence_bleu(output, [reference]).score) / 100.0)


def gleu(output: str, reference: str) -> float:
    from nltk.translate.gleu_score import sentence_gleu

    hyp, ref = output.split(), reference.split()
    if not hyp or not ref:
        return float(hyp == ref)
    return float(sentence_gleu([ref], hyp))


class _NoWordNet:
    """Stands in for NLTK's WordNet corpus: no synonyms, so METEOR matches exact words and stems only."""

    def synsets(self, *_: Any, **__: Any) -> list[Any]:
        return []


def meteor(output: str, reference: str) -> float:
    from nltk.translate.meteor_score import meteor_score

    hyp, ref = output.split(), reference.split()
    if not hyp or not ref:
        return float(hyp == ref)
    return float(meteor_score([ref], hyp, wordnet=_NoWordNet()))


@cache
def _rouge(kind: str) -> Any:
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer([kind], use_stemmer=False)


def rouge(output: str, reference: str, kind: str) -> float:
    """rouge_1..rouge_5, rouge_l -> rouge-score's rouge1..rouge5, rougeL F-measure."""
    name = "rougeL" if kind == "rouge_l" else "rouge" + kind.removeprefix("rouge_")
    return float(_rouge(name).score(reference, output)[name].fmeasure)


def similarity(output: str, reference: str, metric: str) -> float:
    if metric == "fuzzy_match":
        return fuzzy_match(output, reference)
    if metric == "bleu":
        return bleu(output, reference)
    if metric == "gleu":
        return gleu(output, reference)
    if metric == "meteor":
        return meteor(output, reference)
    if metric.startswith("rouge_"):
        return rouge(output, reference, metric)
    raise ValueError(f"unsupported evaluation_metric {metric!r}")
