"""kill -9 the server in the middle of a running job, start it again on the same data directory: the job
resumes from its last checkpoint and finishes, with every earlier event, file and checkpoint kept."""

from __future__ import annotations

import os
import signal
import sqlite3
from pathlib import Path

from livejobs import BASE, start_server, wait_for, wait_status


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead for our purpose; it waits only for its (killed) parent to reap it.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def test_kill_server_mid_job_then_restart_resumes_from_checkpoint(jobs_env: dict[str, Path],
                                                                   tmp_path: Path) -> None:
    data = tmp_path / "data"
    server = start_server(jobs_env["model"], data, jobs_env["keys"], "--workers", "1")
    try:
        client = server.client()
        with open(jobs_env["root"] / "train.jsonl", "rb") as f:
            train = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=train.id, model=BASE, suffix="durable",
                                             extra_body={"tunelab": {"max_steps": 40, "save_every": 10}})
        wait_for(lambda: list(client.fine_tuning.jobs.checkpoints.list(job.id)), timeout=150,
                 what="a first checkpoint")
        before = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        child = sqlite3.connect(data / "jobs.db").execute("select pid from jobs where id = ?", (job.id,)).fetchone()[0]
        server.proc.send_signal(signal.SIGKILL)
        server.proc.wait(timeout=30)
    except BaseException:
        server.stop()
        raise
    assert child and wait_for(lambda: not _pid_alive(child), timeout=20, what="the orphaned child to exit")

    server = start_server(jobs_env["model"], data, jobs_env["keys"], "--workers", "1")
    try:
        client = server.client()
        done = wait_status(client, job.id, timeout=150)
        assert done.status == "succeeded", done.error
        after = list(client.fine_tuning.jobs.list_events(job.id, limit=100))
        after_ids = {e.id for e in after}
        assert all(e.id in after_ids for e in before)  # nothing that happened before the kill is lost
        messages = [e.message for e in after]
        assert any(m.startswith("The server restarted; the job resumes from its last checkpoint") for m in messages)
        resumed = [m for m in messages if m.startswith("Fine-tuning job resumed from checkpoint at step ")]
        assert resumed and int(resumed[0].rsplit(" ", 1)[1]) >= 10
        steps = {e.data["step"] for e in after if e.type == "metrics"}  # type: ignore[index]
        assert steps == set(range(1, 41))
        assert client.files.retrieve(train.id).bytes == (jobs_env["root"] / "train.jsonl").stat().st_size
        reply = client.chat.completions.create(model=done.fine_tuned_model, max_tokens=4,  # type: ignore[arg-type]
                                               messages=[{"role": "user", "content": "echo sun moon"}])
        assert reply.choices[0].message.content is not None
        served = {m.id for m in client.models.list()}
        # the checkpoints written before the kill were served again from the store at restart
        first_ckpt = min(client.fine_tuning.jobs.checkpoints.list(job.id, limit=100), key=lambda c: c.step_number)
        assert done.fine_tuned_model in served and first_ckpt.fine_tuned_model_checkpoint in served
    finally:
        server.stop()
