"""End to end on the real SmolLM2-135M-Instruct (local cache): the guide's job on its built-in name, two
LoRA steps, then a chat with the fine-tuned model through the official client."""

from __future__ import annotations

from pathlib import Path

import pytest
from livejobs import ALICE, start_server, wait_status

from tunelab.model.loading import DEFAULT_MODEL


@pytest.mark.slow
def test_guide_job_on_smollm2(jobs_env: dict[str, Path], tmp_path: Path) -> None:
    server = start_server(Path(DEFAULT_MODEL), tmp_path / "data", jobs_env["keys"], "--served-model-name",
                          DEFAULT_MODEL, "--set", "train.max_steps=2", "--set", "data.max_seq_len=128")
    try:
        client = server.client(ALICE)
        with open(jobs_env["root"] / "train.jsonl", "rb") as f:
            train_file = client.files.create(file=f, purpose="fine-tune")
        job = client.fine_tuning.jobs.create(training_file=train_file.id, model=DEFAULT_MODEL, suffix="smol",
                                             extra_body={"tunelab": {"lora_r": 4}})
        job = wait_status(client, job.id, timeout=400)
        assert job.status == "succeeded", job.error
        assert job.fine_tuned_model == f"ft:{DEFAULT_MODEL}:alice:smol:{job.id.removeprefix('ftjob-')[:8]}"
        reply = client.chat.completions.create(model=job.fine_tuned_model, max_tokens=8,
                                               messages=[{"role": "user", "content": "echo red cat 1"}])
        assert reply.choices[0].message.content
    finally:
        server.stop()
