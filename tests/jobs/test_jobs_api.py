"""The guide's OpenAI fine-tuning code, nearly verbatim, against a live `tunelab serve` on a tiny model:
upload, create with a validation file, poll, events, checkpoints, chat and stream with the ft: model; then
cancel, pause/resume, a bad file, unknown ids, option validation and per-key isolation."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from livejobs import ALICE, BASE, BOB, Server, wait_for, wait_status
from openai import OpenAI


def all_events(client: OpenAI, job_id: str) -> list:  # type: ignore[type-arg]
    # Auto-pagination follows has_more/after, as the client does against OpenAI.
    return list(client.fine_tuning.jobs.list_events(job_id, limit=7))


@pytest.fixture(scope="module")
def guide_job(server: Server, jobs_env: dict[str, Path]) -> dict[str, str]:
    """The guide's code: upload, create, poll to a final status (sleep shortened from 60 s)."""
    root = jobs_env["root"]
    client = server.client()
    with open(root / "train.jsonl", "rb") as f:
        train_file = client.files.create(file=f, purpose="fine-tune")
    with open(root / "val.jsonl", "rb") as f:
        val_file = client.files.create(file=f, purpose="fine-tune")
    assert train_file.id.startswith("file-")
    job = client.fine_tuning.jobs.create(
        training_file=train_file.id,
        validation_file=val_file.id,
        model=BASE,
        hyperparameters={"n_epochs": "auto", "learning_rate_multiplier": "auto", "batch_size": "auto"},
        suffix="medical-notes-v1",
    )
    assert job.id.startswith("ftjob-")
    assert job.status == "validating_files"
    while True:
        job = client.fine_tuning.jobs.retrieve(job.id)
        if job.status in ["succeeded", "failed", "cancelled"]:
            break
        time.sleep(0.5)
    assert job.status == "succeeded", job.error
    return {"job": job.id, "train": train_file.id, "val": val_file.id}


def test_guide_workflow_succeeds_and_serves_the_model(server: Server, guide_job: dict[str, str],
                                                       jobs_env: dict[str, Path]) -> None:
    client = server.client()
    job = client.fine_tuning.jobs.retrieve(guide_job["job"])
    assert job.fine_tuned_model == f"ft:{BASE}:alice:medical-notes-v1:{job.id.removeprefix('ftjob-')[:8]}"
    # auto: 20 examples -> OpenAI's rule gives 100 // 20 = 5 epochs and batch size max(1, 0.2% of 20) = 1
    assert job.hyperparameters.n_epochs == 5 and job.hyperparameters.batch_size == 1
    assert job.trained_tokens and job.trained_tokens > 0 and job.finished_at and job.organization_id == "alice"
    assert job.validation_file == guide_job["val"] and job.training_file == guide_job["train"]

    events = client.fine_tuning.jobs.list_events(job.id, limit=50)
    messages = [e.message for e in events.data]
    assert any(m.startswith("Step 8/8: training loss=") and "validation loss=" in m for m in messages)
    metrics = [e for e in events.data if e.type == "metrics"]
    assert [e.data["step"] for e in reversed(metrics)] == list(range(1, 9))  # newest first, one per step
    last = metrics[0].data
    assert {"step", "train_loss", "valid_loss", "train_mean_token_accuracy"} <= set(last)
    assert events.data[0].message == "The job has successfully completed"
    # paging with `after` walks the same events, oldest last
    paged = all_events(client, job.id)
    assert [e.id for e in paged] == [e.id for e in events.data] and len(paged) > 7

    ckpts = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in ckpts] == [8, 6, 4, 2]
    assert ckpts[0].metrics.train_loss is not None and ckpts[0].metrics.valid_loss is not None
    assert all(c.fine_tuned_model_checkpoint == f"{job.fine_tuned_model}:ckpt-step-{c.step_number}" for c in ckpts)

    models = {m.id for m in client.models.list()}
    assert job.fine_tuned_model in models and ckpts[-1].fine_tuned_model_checkpoint in models
    response = client.chat.completions.create(
        model=job.fine_tuned_model, messages=[{"role": "user", "content": "Summarize this clinical note: ..."}],
        temperature=0.2, max_tokens=8,
    )
    assert response.choices[0].message.content is not None and response.model == job.fine_tuned_model
    stream = client.chat.completions.create(model=ckpts[-1].fine_tuned_model_checkpoint, stream=True, max_tokens=6,
                                            messages=[{"role": "user", "content": "echo red cat"}])
    chunks = list(stream)
    assert chunks and chunks[-1].choices[0].finish_reason in ("stop", "length")

    # the result file: a CSV of metrics per step, downloadable through the Files API
    [result_id] = job.result_files
    csv_text = client.files.content(result_id).text.splitlines()
    assert csv_text[0] == "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy"
    assert len(csv_text) == 9 and csv_text[-1].startswith("8,")
    # uploaded bytes come back unchanged; the stored name is generated, the client's only metadata
    assert client.files.content(guide_job["train"]).content == (jobs_env["root"] / "train.jsonl").read_bytes()
    assert client.files.retrieve(guide_job["train"]).filename == "train.jsonl"


def test_files_api_pagination_delete_and_jsonl_check(server: Server, jobs_env: dict[str, Path]) -> None:
    client = server.client()
    ids = [client.files.create(file=(f"../../etc/n{i}.jsonl", b'{"a": 1}\n'), purpose="fine-tune").id
           for i in range(3)]
    assert client.files.retrieve(ids[0]).filename == "n0.jsonl"  # no directories survive
    page = client.files.list(limit=2, purpose="fine-tune")
    assert len(page.data) == 2 and page.has_more and page.data[0].id == ids[2]  # newest first
    every = [f.id for f in client.files.list(limit=2, purpose="fine-tune")]  # follows `after`
    assert every[:3] == ids[::-1]
    assert client.files.delete(ids[1]).deleted
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(ids[1])
    with pytest.raises(openai.BadRequestError, match="line 2"):
        client.files.create(file=("x.jsonl", b'{"ok": 1}\nnot json\n'), purpose="fine-tune")
    with pytest.raises(openai.APIStatusError, match="upload limit") as too_big:  # --max-upload-bytes 200000
        client.files.create(file=("big.jsonl", b'{"a": 1}\n' * 30_000), purpose="fine-tune")
    assert too_big.value.status_code == 413
    assert len(list(client.files.list(purpose="fine-tune"))) == len(every) - 1  # one deleted, nothing half-stored
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("x.jsonl", b"{}\n"), purpose="nonsense")  # type: ignore[arg-type]


def test_bad_training_file_fails_in_validation_with_line_numbers(server: Server, jobs_env: dict[str, Path]) -> None:
    client = server.client()
    with open(jobs_env["root"] / "bad.jsonl", "rb") as f:
        bad = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=bad.id, model=BASE)
    job = wait_status(client, job.id)
    assert job.status == "failed"
    assert job.error is not None and job.error.code == "invalid_training_file"
    assert job.error.param == "training_file"
    assert "line 3" in job.error.message and "role" in job.error.message and bad.id in job.error.message
    assert job.fine_tuned_model is None
    assert client.fine_tuning.jobs.list_events(job.id).data[0].level == "error"


def test_unknown_ids_are_404_and_bad_requests_400(server: Server, guide_job: dict[str, str]) -> None:
    client = server.client()
    for call in (lambda: client.fine_tuning.jobs.retrieve("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.cancel("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.list_events("ftjob-nope"),
                 lambda: client.fine_tuning.jobs.checkpoints.list("ftjob-nope"),
                 lambda: client.files.retrieve("file-nope"),
                 lambda: client.files.content("file-nope")):
        with pytest.raises(openai.NotFoundError):
            call()
    with pytest.raises(openai.NotFoundError) as e:
        client.fine_tuning.jobs.create(training_file="file-nope", model=BASE)
    assert e.value.body["param"] == "training_file"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError, match="model"):
        client.fine_tuning.jobs.create(training_file=guide_job["train"], model="gpt-4o-mini-2024-07-18")
    with pytest.raises(openai.BadRequestError, match="lora_rank"):  # tunelab options are validated
        client.fine_tuning.jobs.create(training_file=guide_job["train"], model=BASE,
                                       extra_body={"tunelab": {"lora_rank": 8}})
    with pytest.raises(openai.BadRequestError, match="lora_r"):
        client.fine_tuning.jobs.create(training_file=guide_job["train"], model=BASE, metadata={"tunelab.lora_r": "0"})
    with pytest.raises(openai.BadRequestError, match="n_epochs"):
        client.fine_tuning.jobs.create(training_file=guide_job["train"], model=BASE, hyperparameters={"n_epochs": 0})
    with pytest.raises(openai.BadRequestError, match="already"):
        client.fine_tuning.jobs.cancel(guide_job["job"])


def test_second_key_sees_nothing_of_the_first(server: Server, guide_job: dict[str, str]) -> None:
    alice, bob = server.client(ALICE), server.client(BOB)
    job = alice.fine_tuning.jobs.retrieve(guide_job["job"])
    assert job.fine_tuned_model
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.retrieve(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.fine_tuning.jobs.list_events(job.id)
    with pytest.raises(openai.NotFoundError):
        bob.files.content(guide_job["train"])
    with pytest.raises(openai.NotFoundError):  # bob cannot train on alice's file either
        bob.fine_tuning.jobs.create(training_file=guide_job["train"], model=BASE)
    assert job.id not in {j.id for j in bob.fine_tuning.jobs.list()}
    assert guide_job["train"] not in {f.id for f in bob.files.list()}
    bob_models = {m.id for m in bob.models.list()}
    assert BASE in bob_models and not any(m.startswith("ft:") for m in bob_models)
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model=job.fine_tuned_model, messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        OpenAI(base_url=server.url, api_key="sk-wrong", max_retries=0).fine_tuning.jobs.list()


def _long_job(client: OpenAI, train_id: str, steps: int, save_every: int) -> str:
    job = client.fine_tuning.jobs.create(training_file=train_id, model=BASE, seed=7,
                                         extra_body={"tunelab": {"max_steps": steps, "save_every": save_every}})
    return job.id


def _metric_steps(client: OpenAI, job_id: str) -> list[int]:
    return sorted(e.data["step"] for e in all_events(client, job_id) if e.type == "metrics")  # type: ignore[index]


def test_cancel_running_job_stops_it_at_once(server: Server, guide_job: dict[str, str],
                                             jobs_env: dict[str, Path]) -> None:
    client = server.client()
    job_id = _long_job(client, guide_job["train"], steps=5000, save_every=1000)
    wait_for(lambda: _metric_steps(client, job_id), timeout=120, what="training to start")
    running = client.fine_tuning.jobs.retrieve(job_id)
    assert running.status == "running" and running.estimated_finish and running.estimated_finish >= running.created_at
    assert running.trained_tokens is None  # as OpenAI: only once the job has finished
    job = client.fine_tuning.jobs.cancel(job_id)
    assert job.status == "cancelled" and job.finished_at
    steps_then = len(_metric_steps(client, job_id))
    log = jobs_env["root"] / "data" / "jobs" / job_id / "run" / "metrics.jsonl"
    size_then = log.stat().st_size
    time.sleep(2)
    assert log.stat().st_size == size_then  # the training process is dead: it writes nothing more
    assert len(_metric_steps(client, job_id)) == steps_then  # and nothing is reported after the cancel
    job = client.fine_tuning.jobs.retrieve(job_id)
    assert job.status == "cancelled" and job.fine_tuned_model is None
    assert max(_metric_steps(client, job_id)) < 5000


def test_pause_stops_at_a_checkpoint_and_resume_continues(server: Server, guide_job: dict[str, str]) -> None:
    client = server.client()
    job_id = _long_job(client, guide_job["train"], steps=120, save_every=10)
    wait_for(lambda: _metric_steps(client, job_id), timeout=120, what="training to start")
    client.fine_tuning.jobs.pause(job_id)
    job = wait_status(client, job_id, ("paused", "succeeded", "failed"))
    assert job.status == "paused", job.error
    ckpts = [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id)]
    assert ckpts and all(s % 10 == 0 for s in ckpts)
    paused_at = max(ckpts)
    assert max(_metric_steps(client, job_id)) < 120  # paused before the end (room for a loaded machine)
    assert client.fine_tuning.jobs.resume(job_id).status in ("queued", "running")  # a free worker claims it at once
    job = wait_status(client, job_id)
    assert job.status == "succeeded", job.error
    messages = [e.message for e in all_events(client, job_id)]
    assert f"Fine-tuning job resumed from checkpoint at step {paused_at}" in messages
    assert set(_metric_steps(client, job_id)) == set(range(1, 121))
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job_id, limit=100)][0] == 120


def test_dpo_job_on_openai_preference_format(server: Server, jobs_env: dict[str, Path]) -> None:
    """method dpo with beta, on OpenAI's DPO file format (input / preferred_output / non_preferred_output)."""
    import json

    rows = [{"input": {"messages": [{"role": "user", "content": f"say {w} {i}"}]},
             "preferred_output": [{"role": "assistant", "content": f"{w}"}],
             "non_preferred_output": [{"role": "assistant", "content": f"no {w}!"}]}
            for i, w in enumerate(["red", "blue", "green", "cat", "dog", "sun"] * 2)]
    client = server.client()
    f = client.files.create(file=("prefs.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()),
                            purpose="fine-tune")
    job = client.fine_tuning.jobs.create(
        training_file=f.id, model=BASE, suffix="dpo",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "batch_size": 2}}},
        extra_body={"tunelab": {"max_steps": 3}})
    job = wait_status(client, job.id)
    assert job.status == "succeeded", job.error
    assert job.method is not None and job.method.type == "dpo"
    assert job.method.dpo is not None and job.method.dpo.hyperparameters.beta == 0.2  # type: ignore[union-attr]
    assert _metric_steps(client, job.id) == [1, 2, 3]
    assert job.fine_tuned_model in {m.id for m in client.models.list()}
    # the upload itself is untouched by the conversion (the job converts its own copy)
    assert b"preferred_output" in client.files.content(f.id).content


def test_full_fine_tuning_job_succeeds_and_says_how_to_serve_it(server: Server, guide_job: dict[str, str]) -> None:
    # finetune: full writes a whole model: this server (one base + adapters) cannot hot-swap it, and says so.
    client = server.client()
    job = client.fine_tuning.jobs.create(training_file=guide_job["train"], model=BASE, suffix="full",
                                         extra_body={"tunelab": {"finetune": "full", "max_steps": 4, "save_every": 2}})
    job = wait_status(client, job.id)
    assert job.status == "succeeded", job.error
    assert [c.step_number for c in client.fine_tuning.jobs.checkpoints.list(job.id)] == [4, 2]
    warnings = [e.message for e in all_events(client, job.id) if "is a full fine-tuned model" in e.message]
    assert any(m.startswith(f"{job.fine_tuned_model} is a full") and "tunelab serve --model" in m for m in warnings)
    assert job.fine_tuned_model not in {m.id for m in client.models.list()}


def test_a_crashing_training_process_fails_the_job_not_the_server(server: Server, guide_job: dict[str, str],
                                                                 jobs_env: dict[str, Path]) -> None:
    import os
    import signal
    import sqlite3

    client = server.client()
    job_id = _long_job(client, guide_job["train"], steps=5000, save_every=1000)
    wait_for(lambda: _metric_steps(client, job_id), timeout=120, what="training to start")
    db = sqlite3.connect(jobs_env["root"] / "data" / "jobs.db")
    pid = db.execute("select pid from jobs where id = ?", (job_id,)).fetchone()[0]
    os.kill(pid, signal.SIGKILL)  # as the kernel's OOM killer would
    job = wait_status(client, job_id, timeout=60)
    assert job.status == "failed" and job.error is not None and job.error.code == "training_crashed"
    assert client.fine_tuning.jobs.retrieve(guide_job["job"]).status == "succeeded"  # the server lives on


def test_jobs_cli_on_the_official_client(server: Server, guide_job: dict[str, str],
                                         jobs_env: dict[str, Path]) -> None:
    from typer.testing import CliRunner

    from tunelab.cli import app
    from tunelab.jobs.cli import jobs_app

    if not any(g.name == "jobs" for g in app.registered_groups):
        app.add_typer(jobs_app, name="jobs")
    runner = CliRunner()
    env = {"OPENAI_API_KEY": ALICE}

    def run(*args: str) -> str:
        res = runner.invoke(app, ["jobs", *args, "--base-url", server.url], env=env)
        assert res.exit_code == 0, res.output
        return res.output

    job_id = guide_job["job"]
    assert job_id in run("list")
    assert '"status": "succeeded"' in run("get", job_id)
    out = run("events", job_id, "--follow")  # returns at once: the job has finished
    assert "Step 8/8: training loss=" in out and out.strip().endswith("The job has successfully completed")
    assert "ckpt-step-2" in run("checkpoints", job_id)
    file_id = run("upload", str(jobs_env["root"] / "train.jsonl")).strip()
    assert file_id.startswith("file-")
    created = run("create", file_id, "--model", BASE, "-o", "max_steps=5000", "--suffix", "cli")
    new_id = next(line.split('"')[3] for line in created.splitlines() if line.strip().startswith('"id"'))
    assert run("cancel", new_id).strip() == "cancelled"
    res = runner.invoke(app, ["jobs", "get", "ftjob-nope", "--base-url", server.url], env=env)
    assert res.exit_code != 0


def test_succeeded_job_is_registered_and_served_by_registry_name(server: Server, guide_job: dict[str, str],
                                                                 jobs_env: dict[str, Path]) -> None:
    """Auto-registration: each checkpoint a version (step order, the final model last), production on the last;
    served by name to its owner only, with the version header; the ft: names keep working."""
    from tunelab.registry import Registry

    client = server.client()
    job = client.fine_tuning.jobs.retrieve(guide_job["job"])
    name = f"ft-{BASE}-medical-notes-v1-{job.id.removeprefix('ftjob-')[:8]}"
    reg = Registry.open(jobs_env["root"] / "data")
    try:
        versions = reg.versions(name, owner="alice")
        assert [v.lineage["step"] for v in versions] == [2, 4, 6, 8]
        assert versions[-1].lineage["fine_tuned_model"] == f"{job.fine_tuned_model}:ckpt-step-8"
        assert versions[-1].lineage["fine_tuning_job"] == job.id and versions[-1].kind == "adapter"
        assert reg.resolve(name, owner="alice").version == 4 and not reg.exists(name, owner="bob")
    finally:
        reg.close()
    assert any(e.message.startswith(f"Registered in the model registry as {name}")
               for e in client.fine_tuning.jobs.list_events(job.id, limit=50).data)
    raw = client.chat.completions.with_raw_response.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                           max_tokens=4)
    assert raw.headers["x-tunelab-model-version"] == f"{name}@4"
    raw = client.chat.completions.with_raw_response.create(model=f"{name}@1", max_tokens=4,
                                                           messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tunelab-model-version"] == f"{name}@1"
    raw = client.chat.completions.with_raw_response.create(model=job.fine_tuned_model, max_tokens=4,
                                                           messages=[{"role": "user", "content": "hi"}])
    assert raw.headers["x-tunelab-model-version"] == job.fine_tuned_model
    assert name in {m.id for m in client.models.list()}
    with pytest.raises(openai.NotFoundError):
        server.client(BOB).chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                   max_tokens=2)
