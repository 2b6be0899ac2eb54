"""Reinforcement fine-tuning jobs through the official `openai` client against a live server on the tiny model.

The task: tiny arithmetic prompts whose answer is always 5 ("What is 2+3?"), graded by OpenAI's string_check
(`like`: the output contains `{{item.answer}}`); the training file's extra field `answer` is the item. A random
2-layer model emits a "5" in about 10% of its 16-token samples (the digit this seed's model emits most); GRPO
(8 per prompt, LoRA, constant lr 1e-2, seeded) must raise the mean reward (0.12 -> 1.0 by step 9 in a run of
tunelab train on the same settings while this test was written). Also: a python grader that loops forever is killed and fails the job with an error
naming it; a python grader cannot connect to the server (graders/run); invalid graders and reinforcement
hyperparameters we cannot honour are 400s naming the field.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openai
import pytest
from livejobs import BASE, Server, wait_status

OUT = "{{sample.output_text}}"
FIVE = {"type": "string_check", "name": "says-five", "input": OUT, "reference": "{{item.answer}}",
         "operation": "like"}


def rows(pairs: list[tuple[int, int]]) -> bytes:
    lines = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"}], "answer": str(a + b), "id": f"q{a}"}
             for a, b in pairs]
    return "".join(json.dumps(r) + "\n" for r in lines).encode()


@pytest.fixture(scope="module")
def files(server: Server) -> dict[str, str]:
    c = server.client()
    train = c.files.create(file=("rft.jsonl", rows([(a, 5 - a) for a in range(6)] * 2)), purpose="fine-tune")
    valid = c.files.create(file=("rft-valid.jsonl", rows([(a, 5 - a) for a in range(1, 5)])), purpose="fine-tune")
    return {"train": train.id, "valid": valid.id}


def create(server: Server, files: dict[str, str], grader: dict[str, Any], hp: dict[str, Any] | None = None,
           valid: bool = False, **tunelab: Any) -> Any:
    return server.client().fine_tuning.jobs.create(
        model=BASE, training_file=files["train"], validation_file=files["valid"] if valid else None, seed=3,
        method={"type": "reinforcement", "reinforcement": {"grader": grader, "hyperparameters": hp or {}}},  # type: ignore[typeddict-item]
        extra_body={"tunelab": {"max_new_tokens": 8, "learning_rate": 0.01, "kl_coef": 0.0, **tunelab}})


def metric_events(server: Server, job_id: str) -> list[dict[str, Any]]:
    evs = list(server.client().fine_tuning.jobs.list_events(job_id, limit=100))
    return sorted((e.data for e in evs if e.type == "metrics"), key=lambda d: d["step"])


def test_string_check_job_raises_mean_reward(server: Server, files: dict[str, str]) -> None:
    job = create(server, files, FIVE, {"batch_size": 4, "compute_multiplier": 2, "eval_interval": 6}, valid=True,
                 max_steps=12, max_new_tokens=16, schedule="constant")
    assert job.method.type == "reinforcement"
    done = wait_status(server.client(), job.id, timeout=400)
    assert done.status == "succeeded", done.error
    assert done.hyperparameters.batch_size == 4
    data = metric_events(server, job.id)
    rewards = [d["train_reward_mean"] for d in data]
    assert len(rewards) == 12, data
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
    valid = [d for d in data if "valid_reward_mean" in d]
    assert [d["step"] for d in valid] == [6, 12] and all(0 <= d["valid_reward_mean"] <= 1 for d in valid)
    evs = [e.message for e in server.client().fine_tuning.jobs.list_events(job.id, limit=100)]
    assert any("mean reward=" in m for m in evs)
    assert done.fine_tuned_model


def test_python_grader_that_never_returns_fails_the_job(server: Server, files: dict[str, str]) -> None:
    forever = {"type": "python", "name": "forever", "source": "def grade(sample, item):\n    while True:\n        pass\n"}
    job = create(server, files, forever, {"batch_size": 2, "compute_multiplier": 0.5}, max_steps=2,
                 grader_timeout_s=2)
    done = wait_status(server.client(), job.id, timeout=300)
    assert done.status == "failed"
    assert "python grader 'forever' did not finish grade() within 2s" in done.error.message, done.error
    assert "rft.jsonl" not in done.error.message or "line" in done.error.message


def test_python_grader_cannot_reach_the_server(server: Server) -> None:
    port = urlparse(server.url).port
    src = ("import socket\n"
           "def grade(sample, item):\n"
           "    try:\n"
           f"        socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
           "        return 1.0\n"
           "    except OSError:\n"
           "        return 0.0\n")
    c = server.client()
    out = c.post("/fine_tuning/alpha/graders/run", cast_to=object,
                 body={"grader": {"type": "python", "name": "net", "source": src}, "model_sample": "x"})
    assert out["reward"] == 0.0 and not out["metadata"]["errors"]["python_grader_runtime_error"], out  # type: ignore[index]
    ok = c.post("/fine_tuning/alpha/graders/run", cast_to=object,
                body={"grader": FIVE, "model_sample": "it is 5", "item": {"answer": "5"}})
    assert ok["reward"] == 1.0  # type: ignore[index]


@pytest.mark.parametrize(("grader", "hp", "param"), [
    ({**FIVE, "operation": "contains"}, {}, "method.reinforcement.grader.operation"),
    ({"type": "regex", "name": "r"}, {}, "method.reinforcement.grader.type"),
    ({"type": "python", "name": "p", "source": "print(1)"}, {}, "method.reinforcement.grader.source"),
    ({"type": "multi", "name": "m", "graders": {"a": FIVE}, "calculate_output": "__import__('os')"}, {},
     "method.reinforcement.grader.calculate_output"),
    ({"type": "score_model", "name": "j", "model": "gpt-4o", "input": [{"role": "user", "content": OUT}]}, {},
     "method.reinforcement.grader.model"),
    (FIVE, {"reasoning_effort": "high"}, "method.reinforcement.hyperparameters.reasoning_effort"),
    (FIVE, {"eval_samples": 4}, "method.reinforcement.hyperparameters.eval_samples"),
    (FIVE, {"compute_multiplier": 100}, "method.reinforcement.hyperparameters.compute_multiplier"),
])
def test_invalid_graders_are_400s_naming_the_field(server: Server, files: dict[str, str], grader: dict[str, Any],
                                                   hp: dict[str, Any], param: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        create(server, files, grader, hp)
    assert e.value.param == param, e.value.body


def test_graders_validate_endpoint(server: Server) -> None:
    c = server.client()
    assert c.post("/fine_tuning/alpha/graders/validate", cast_to=object, body={"grader": FIVE}) == {"grader": FIVE}
    with pytest.raises(openai.BadRequestError) as e:
        c.post("/fine_tuning/alpha/graders/validate", cast_to=object, body={"grader": {**FIVE, "input": "{{x}}"}})
    assert e.value.param == "grader.input"


def test_missing_item_field_is_a_training_file_error(server: Server, files: dict[str, str]) -> None:
    grader = {**FIVE, "reference": "{{item.expected}}"}
    job = create(server, files, grader, {"batch_size": 2}, max_steps=1)
    done = wait_status(server.client(), job.id, timeout=200)
    assert done.status == "failed" and done.error.param == "training_file"
    assert "line 1, field expected" in done.error.message, done.error


def test_reinforcement_maps_onto_grpo() -> None:
    """In-process: compute_multiplier 2 -> 8 completions per prompt; eval_interval -> eval_every; the grader
    travels in the config; the resolved hyperparameters say what ran."""
    from tunelab.jobs import hyper

    req = hyper.JobCreate.model_validate({
        "model": "b", "training_file": "file-1", "seed": 1,
        "method": {"type": "reinforcement", "reinforcement": {"grader": FIVE, "hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "compute_multiplier": 2, "eval_interval": 3, "eval_samples": 1,
            "reasoning_effort": "default"}}},
        "tunelab": {"max_new_tokens": 12, "kl_coef": 0.1}})
    cfg, resolved = hyper.build_config(base_model="b", train_path="t.jsonl", valid_path="v.jsonl", output_dir="o",
                                       req=req, n_examples=40)
    assert cfg.method == "grpo" and cfg.grpo is not None
    assert (cfg.grpo.group_size, cfg.grpo.kl_coef, cfg.grpo.generation.max_new_tokens) == (8, 0.1, 12)
    assert cfg.grpo.grader == FIVE and cfg.train.eval_every == 3 and cfg.train.epochs == 2
    assert resolved == {"n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": 1.0, "eval_interval": 3,
                        "eval_samples": 1, "compute_multiplier": 2.0, "reasoning_effort": "default"}
    with pytest.raises(hyper.OptionError) as e:  # an RL-only option on a supervised job
        hyper.build_config(base_model="b", train_path="t", valid_path=None, output_dir="o", n_examples=10,
                           req=hyper.JobCreate.model_validate({"model": "b", "training_file": "f",
                                                               "tunelab": {"max_new_tokens": 8}}))
    assert e.value.param == "tunelab.max_new_tokens"


def test_reward_fields_join_the_metrics_events(tmp_path: Path) -> None:
    from tunelab.jobs.harvest import Event
    from tunelab.jobs.workers import with_rewards

    p = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "baseline": True, "valid_reward": 0.25}, {"step": 1, "train_loss": 0.1, "train_reward": 0.5},
             {"step": 1, "valid_reward": 0.75}]
    p.write_text("".join(json.dumps(m) + "\n" for m in lines))
    evs = [Event("Baseline (before training): validation loss=nan"),
           Event("Step 1/2: training loss=0.1000", type="metrics", data={"step": 1, "train_loss": 0.1})]
    out = with_rewards(p, 0, p.stat().st_size, evs)
    assert out[0].message == "Baseline (before training): validation mean reward=0.2500"
    assert out[1].data == {"step": 1, "train_loss": 0.1, "train_reward_mean": 0.5, "valid_reward_mean": 0.75,
                           "full_valid_reward_mean": 0.75}
    assert out[1].message.endswith("mean reward=0.5000, validation mean reward=0.7500")


def test_multi_grader_with_the_base_as_judge_and_python(server: Server, files: dict[str, str]) -> None:
    """A multi grader in a training job: score_model graded by the base model being trained (adapters off,
    in the training process), a python grader in its sandbox, combined by the formula."""
    grader = {"type": "multi", "name": "mix", "calculate_output": "0.5 * judge + 0.5 * short", "graders": {
        "judge": {"type": "score_model", "name": "judge", "model": BASE, "range": [0, 1],
                  "input": [{"role": "user", "content": "Rate {{sample.output_text}} for {{item.answer}}"}],
                  "sampling_params": {"max_completions_tokens": 4}},
        "short": {"type": "python", "name": "short",
                  "source": "def grade(sample, item):\n    return 1.0 if len(sample['output_text']) < 4 else 0.0\n"}}}
    job = create(server, files, grader, {"batch_size": 2, "compute_multiplier": 0.5}, max_steps=1)
    done = wait_status(server.client(), job.id, timeout=300)
    assert done.status == "succeeded", done.error
    (data,) = metric_events(server, job.id)
    assert 0.0 <= data["train_reward_mean"] <= 1.0
