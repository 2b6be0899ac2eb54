"""A plain `tunelab serve` has the Files and Fine-tuning Jobs APIs on (data under $XDG_DATA_HOME/tunelab), so the
guide's client code runs against it; `--no-jobs` turns them off."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from livejobs import ALICE, TERMINAL
from openai import NotFoundError, OpenAI


def _serve(jobs_env: dict[str, Path], xdg: Path, *extra: str) -> tuple[subprocess.Popen[str], str]:
    cmd = [sys.executable, "-c", "from tunelab.cli import main; main()", "serve", "--port", "0",
           "--model", str(jobs_env["model"]), "--api-keys-file", str(jobs_env["keys"]), *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "XDG_DATA_HOME": str(xdg)})
    assert proc.stdout is not None
    url = None
    deadline = time.time() + 180
    while time.time() < deadline and url is None:
        line = proc.stdout.readline()
        if not line:
            break
        if m := re.match(r"serving on (\S+)", line):
            url = m.group(1)
    if url is None:
        proc.kill()
        raise AssertionError("server did not start")
    return proc, url


def _stop(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def test_no_jobs_turns_the_files_and_jobs_apis_off(jobs_env: dict[str, Path], tmp_path: Path) -> None:
    proc, url = _serve(jobs_env, tmp_path / "xdg", "--no-jobs")
    try:
        client = OpenAI(base_url=url, api_key=ALICE, max_retries=0, timeout=60)
        with pytest.raises(NotFoundError):
            client.files.list()
        assert client.models.list().data  # the model APIs still answer
    finally:
        _stop(proc)
    assert not (tmp_path / "xdg").exists()  # nothing written to the data home


def test_plain_tunelab_serve_runs_a_fine_tuning_job(jobs_env: dict[str, Path], tmp_path: Path) -> None:
    proc, url = _serve(jobs_env, tmp_path / "xdg")
    deadline = time.time() + 180
    try:
        client = OpenAI(base_url=url, api_key=ALICE, max_retries=0, timeout=60)
        with open(jobs_env["root"] / "train.jsonl", "rb") as f:
            train_file = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=train_file.id, model=str(jobs_env["model"]),
                                             hyperparameters={"n_epochs": 1, "batch_size": 4}, suffix="serve")
        while job.status not in TERMINAL and time.time() < deadline + 240:
            time.sleep(0.5)
            job = client.fine_tuning.jobs.retrieve(job.id)
        assert job.status == "succeeded", job.error
        reply = client.chat.completions.create(model=job.fine_tuned_model or "", max_tokens=4,
                                               messages=[{"role": "user", "content": "echo red blue"}])
        assert reply.choices[0].message.content is not None
    finally:
        _stop(proc)
    assert (tmp_path / "xdg" / "tunelab").is_dir()  # the data dir is the user's data home
