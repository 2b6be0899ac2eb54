"""score_model and label_model graders: a chat model reads the rendered `input` messages and answers.

The chat backend is a function (model, [messages per sample], sampling params) -> [answer per sample]:
  * `http_chat(base_url, api_key)`: any OpenAI-compatible `/chat/completions` endpoint (TUNELAB_GRADER_BASE_URL
    and TUNELAB_GRADER_API_KEY name one for a whole server);
  * otherwise the caller's own: a training job grades with the base model it is fine-tuning (adapters off), the
    graders endpoints with the served base through the engine.
A system message asking for the answer's form is appended (a number in `range`; one of `labels`). A score is
read from JSON `{"result": x}` (OpenAI's structured output) or the first number in the answer, clipped to the
range; an answer with no number scores the range's low end. A label is the answer itself, or the first label
it mentions; one that is in `passing_labels` scores 1, anything else 0.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tunelab.graders.spec import GraderError, LabelModel, SamplingParams, ScoreModel

ChatFn = Callable[[str, list[list[dict[str, str]]], SamplingParams | None], list[str]]
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")
ENV_URL, ENV_KEY = "TUNELAB_GRADER_BASE_URL", "TUNELAB_GRADER_API_KEY"


def env_chat() -> ChatFn | None:
    """The endpoint the server's environment names for model graders, if any."""
    url = os.environ.get(ENV_URL)
    return http_chat(url, os.environ.get(ENV_KEY, "none")) if url else None


def http_chat(base_url: str, api_key: str, timeout_s: float = 120.0, parallel: int = 8) -> ChatFn:
    import httpx

    url = base_url.rstrip("/") + "/chat/completions"

    def one(client: httpx.Client, model: str, msgs: list[dict[str, str]], sp: SamplingParams | None) -> str:
        body: dict[str, Any] = {"model": model, "messages": msgs}
        if sp is not None:
            body.update({k: v for k, v in {"seed": sp.seed, "temperature": sp.temperature, "top_p": sp.top_p,
                                           "max_completion_tokens": sp.max_completions_tokens,
                                           "reasoning_effort": sp.reasoning_effort}.items() if v is not None})
        try:
            r = client.post(url, json=body, headers={"Authorization": f"Bearer {api_key}"})
        except httpx.HTTPError as e:
            raise GraderError(f"model grader: {url} could not be reached: {e}") from None
        if r.status_code != 200:
            raise GraderError(f"model grader: {url} answered {r.status_code}: {r.text[:300]}")
        try:
            return str(r.json()["choices"][0]["message"]["content"] or "")
        except (ValueError, KeyError, IndexError, TypeError):
            raise GraderError(f"model grader: {url} did not answer a chat completion: {r.text[:300]}") from None

    def chat(model: str, batch: list[list[dict[str, str]]], sp: SamplingParams | None) -> list[str]:
        with httpx.Client(timeout=timeout_s) as client, ThreadPoolExecutor(parallel) as pool:
            return list(pool.map(lambda m: one(client, model, m, sp), batch))

    return chat


def instruction(spec: ScoreModel | LabelModel) -> str:
    if isinstance(spec, ScoreModel):
        lo, hi = spec.bounds
        return f"Answer with a single number from {lo:g} to {hi:g} and nothing else."
    return "Answer with exactly one of these labels and nothing else: " + ", ".join(spec.labels)


def parse_score(answer: str, lo: float, hi: float) -> float:
    value: Any = None
    try:
        obj = json.loads(answer)
        value = obj.get("result", obj.get("score")) if isinstance(obj, dict) else obj
    except ValueError:
        pass
    if not isinstance(value, int | float) or isinstance(value, bool):
        m = _NUMBER.search(answer)
        value = float(m.group()) if m else lo
    return min(hi, max(lo, float(value)))


def parse_label(answer: str, labels: list[str]) -> str | None:
    text = answer.strip()
    try:
        obj = json.loads(text)
        if isinstance(obj, dict) and isinstance(obj.get("result"), str):
            text = obj["result"].strip()
    except ValueError:
        pass
    low = text.lower().strip(" .!\"'`")
    for lab in labels:
        if low == lab.lower():
            return lab
    hits = [(low.find(lab.lower()), -len(lab), lab) for lab in labels if lab.lower() in low]
    return min(hits)[2] if hits else None
