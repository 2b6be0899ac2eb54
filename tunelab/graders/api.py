"""OpenAI's `/v1/fine_tuning/alpha/graders/validate` and `/run`, as plain functions the routes call.

`validate(body)` answers `{"grader": ...}` or raises GraderError naming the field (a 400). `run(body)` grades one
`model_sample` (the model's output text) against an optional `item` and answers OpenAI's GraderRunResponse
shape: `reward`, `metadata` (name, type, errors, execution_time, scores, token_usage, sampled_model_name) and
`sub_rewards` (a multi grader's graders). A grader that fails while scoring (a python grader over its time
limit, an exception inside grade()) is not a 4xx: as at OpenAI, the reward is 0 and `metadata.errors` says
what went wrong. python graders run in their own process (tunelab/graders/sandbox.py), never in the server's;
score_model / label_model graders use TUNELAB_GRADER_BASE_URL's endpoint (without one they are refused here,
while training jobs grade with the base model being trained).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from tunelab.graders.model import ENV_URL, env_chat
from tunelab.graders.runtime import Grader
from tunelab.graders.spec import GraderError, GraderSpec, LabelModel, Multi, ScoreModel, parse_grader

MAX_SAMPLE = 1024 * 1024
_SLOTS = threading.BoundedSemaphore(4)  # python graders running for this endpoint at once
ERROR_FLAGS = ("formula_parse_error", "invalid_variable_error", "model_grader_parse_error",
               "model_grader_refusal_error", "model_grader_server_error", "other_error",
               "python_grader_runtime_error", "python_grader_server_error", "sample_parse_error",
               "truncated_observation_error", "unresponsive_reward_error")


def _uses_model(spec: GraderSpec) -> bool:
    if isinstance(spec, ScoreModel | LabelModel):
        return True
    return isinstance(spec, Multi) and any(_uses_model(s) for s in spec.parsed.values())


def validate(body: dict[str, Any]) -> dict[str, Any]:
    if "grader" not in body:
        raise GraderError("grader: is required", param="grader")
    parse_grader(body["grader"], "grader")
    return {"grader": body["grader"]}


def run(body: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(set(body) - {"grader", "model_sample", "item"})
    if unknown:
        raise GraderError(f"{unknown[0]}: unknown field", param=unknown[0])
    if "grader" not in body:
        raise GraderError("grader: is required", param="grader")
    spec = parse_grader(body["grader"], "grader")
    sample, item = body.get("model_sample"), body.get("item", {})
    if not isinstance(sample, str):
        raise GraderError("model_sample: is required (the model's output, a string)", param="model_sample")
    if len(sample) > MAX_SAMPLE:
        raise GraderError(f"model_sample: longer than {MAX_SAMPLE} characters", param="model_sample")
    if not isinstance(item, dict):
        raise GraderError("item: must be an object (the data row's fields)", param="item")
    chat = env_chat()
    if chat is None and _uses_model(spec):
        raise GraderError(f"grader: score_model and label_model graders need an endpoint here: the server sets "
                          f"{ENV_URL} (training jobs grade with their base model instead)", param="grader")
    errors: dict[str, Any] = dict.fromkeys(ERROR_FLAGS, False)
    errors.update(model_grader_server_error_details=None, python_grader_runtime_error_details=None,
                  python_grader_server_error_type=None)
    t0 = time.perf_counter()
    reward, sub = 0.0, {}
    with _SLOTS, Grader(spec, chat=chat) as g:
        try:
            scores, parts = g.grade([sample], [item])
            reward, sub = scores[0], {k: v[0] for k, v in parts.items()}
        except GraderError as e:
            kind = "python_grader_runtime_error" if "python grader" in e.message else \
                "model_grader_server_error" if "model grader" in e.message else "other_error"
            errors[kind] = True
            if kind != "other_error":
                errors[f"{kind}_details"] = e.message
            else:  # a template or formula that failed on this sample; OpenAI has only the flag for it
                errors["other_error_details"] = e.message
    return {"object": "fine_tuning.alpha.graders.run", "reward": reward, "sub_rewards": sub,
            "model_grader_token_usage_per_model": {},
            "metadata": {"name": spec.name, "type": spec.type, "errors": errors,
                         "execution_time": round(time.perf_counter() - t0, 4), "scores": {spec.name: reward, **sub},
                         "token_usage": None, "sampled_model_name": None}}
