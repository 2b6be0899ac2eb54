"""`tunelab serve --data-dir` is the same server as `serve-jobs`: the guide's client code can point at `tunelab serve`."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import ALICE, TERMINAL
from openai import OpenAI


def test_tunelab_serve_with_data_dir_runs_a_fine_tuning_job(jobs_env: dict[str, Path], tmp_path: Path) -> None:
    cmd = [sys.executable, "-c", "from tunelab.cli import main; main()", "serve", "--port", "0",
           "--model", str(jobs_env["model"]), "--data-dir", str(tmp_path / "data"), "--api-keys-file", str(jobs_env["keys"])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    try:
        assert proc.stdout is not None
        url = None
        deadline = time.time() + 180
        while time.time() < deadline and url is None:
            line = proc.stdout.readline()
            if not line:
                break
            if m := re.match(r"serving on (\S+)", line):
                url = m.group(1)
        assert url, "server did not start"
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
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
