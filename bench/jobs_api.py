"""Benchmark of the fine-tuning jobs API: (1) job overhead -- server time beyond the training itself -- for a
small job on a live `tunelab serve`; (2) API latency with 10,000 jobs and 10,000 files in the store.

    python bench/jobs_api.py                 # both parts
    python bench/jobs_api.py --part list     # only the list-latency part (no training)

Prints tables; figures go to docs/benchmarks.md under "## Fine-tuning jobs API".
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))  # tiny model builder

KEY = "sk-bench"


def _table(title: str, header: list[str], rows: list[list[Any]]) -> None:
    print(f"\n{title}")
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print("  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)))
    for r in rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(r, widths, strict=True)))


# ---------------------------------------------------------------------------------------------- part 1
class _Server:
    def __init__(self, proc: subprocess.Popen[str], url: str) -> None:
        self.proc, self.url = proc, url

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def _start_server(model: Path, data: Path, keys: Path, *extra: str) -> _Server:
    cmd = [sys.executable, "-c", "from tunelab.cli import main; main()", "serve", "--port", "0", "--model",
           str(model), "--served-model-name", "tiny-llama", "--data-dir", str(data), "--api-keys-file", str(keys),
           *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    for line in proc.stdout:
        m = re.match(r"serving on (\S+)", line)
        if m:
            threading.Thread(target=lambda: [None for _ in proc.stdout or ()], daemon=True).start()  # drain
            return _Server(proc, m.group(1))
    raise RuntimeError("server did not start")


def job_overhead(jobs: int, steps: int, idle: float) -> None:
    from tiny import chat_rows, save_tiny, write_jsonl

    root = Path(tempfile.mkdtemp(prefix="bench-jobs-"))
    model = save_tiny(root / "tiny")
    write_jsonl(root / "train.jsonl", chat_rows(40))
    keys = root / "keys"
    keys.write_text(f"{KEY} bench\n")
    server = _start_server(model, root / "data", keys, "--workers", "1", "--set", f"train.max_steps={steps}")
    rows = []
    try:
        from openai import OpenAI

        client = OpenAI(base_url=server.url, api_key=KEY, max_retries=0)
        with open(root / "train.jsonl", "rb") as f:
            train = client.files.create(file=f, purpose="fine-tune")
        time.sleep(45)  # let the warm children finish importing (they do so once, at server start)
        for i in range(2 * jobs + 1):
            if i > jobs:
                time.sleep(idle)  # an idle server: the worker's next warm child is ready
            t0 = time.perf_counter()
            job = client.fine_tuning.jobs.create(training_file=train.id, model="tiny-llama")
            t_queued = t_running = None
            while job.status not in ("succeeded", "failed", "cancelled"):
                time.sleep(0.05)
                job = client.fine_tuning.jobs.retrieve(job.id)
                now = time.perf_counter() - t0
                if job.status in ("queued", "running") and t_queued is None:
                    t_queued = now
                if job.status == "running" and t_running is None:
                    t_running = now
            total = time.perf_counter() - t0
            assert job.status == "succeeded", job.error
            jdir = root / "data" / "jobs" / job.id
            train_s = json.loads((jdir / "result.json").read_text())["seconds"]
            valid_s = json.loads((jdir / "validate.json").read_text())["seconds"]
            label = "first (not counted)" if i == 0 else f"job {i}, " + (
                "back-to-back" if i <= jobs else f"after {idle:.0f} s idle")
            rows.append([label, f"{total:.2f}", f"{valid_s:.2f}", f"{t_queued or 0:.2f}", f"{train_s:.2f}",
                         f"{total - train_s:.2f}"])
    finally:
        server.stop()
    _table(f"Job overhead: tiny Llama, 40 examples, {steps} steps, 1 worker (seconds)",
           ["job", "create->succeeded", "validation work", "->queued", "train() in child", "overhead"], rows)
    for kind, part in (("back-to-back", rows[1:jobs + 1]), ("after idle", rows[jobs + 1:])):
        if part:
            print(f"median overhead, {kind}: {statistics.median(float(r[-1]) for r in part):.2f} s")


# ---------------------------------------------------------------------------------------------- part 2
def _time(fn: Callable[[], Any], reps: int) -> tuple[float, float]:
    fn()
    samples = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    samples.sort()
    return statistics.median(samples), samples[int(0.95 * (len(samples) - 1))]


def _scale(scale_jobs: int, scale_files: int, n_events: int, reps: int) -> list[list[Any]]:
    from fastapi.testclient import TestClient

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the tests' fake engine: no model
    from fake_engine import FakeEngine

    from tunelab.jobs.app import build_jobs_app
    from tunelab.jobs.service import JobsSettings
    from tunelab.jobs.store import events, files, jobs, new_id
    from tunelab.server import ServerSettings

    data = Path(tempfile.mkdtemp(prefix="bench-list-"))
    settings = JobsSettings(data_dir=data, base_model="fake-base", served_names=("fake-base",))
    app = build_jobs_app(FakeEngine(), ServerSettings(api_keys={KEY: "bench", "sk-other": "other"}), settings)
    store = app.state.jobs.store
    t0 = time.perf_counter()
    with store.write() as c:
        c.execute(files.insert(), [dict(id=new_id("file-"), owner="bench" if i % 2 else "other",
                                        filename=f"f{i}.jsonl", purpose="fine-tune", bytes=10, created_at=i,
                                        status="processed", storage="x", deleted=False)
                                   for i in range(2 * scale_files)])
        job_rows = [dict(id=new_id("ftjob-"), owner="bench" if i % 2 else "other", model="fake-base",
                         training_file="file-x", status="succeeded" if i % 3 else "queued", created_at=i,
                         seed=1, hyperparameters={"n_epochs": 3}, method={"type": "supervised"}, options={},
                         result_files=[], pause_requested=False, step=0, metrics_offset=0, last_train_step=0,
                         last_valid_step=-1) for i in range(2 * scale_jobs)]
        c.execute(jobs.insert(), job_rows)
        mine = [r["id"] for r in job_rows if r["owner"] == "bench"]
        c.execute(events.insert(), [dict(id=new_id("ftevent-"), job_id=mine[-1], created_at=i, level="info",
                                         type="metrics", message=f"Step {i}", data={"step": i})
                                    for i in range(n_events)])
    fill = time.perf_counter() - t0
    # no `with`: the app's startup (and so its workers) does not run; nothing trains in this part
    http = TestClient(app, headers={"Authorization": f"Bearer {KEY}"})
    deep = mine[len(mine) // 10]  # a cursor 90% of the way down the list (newest first)
    last = mine[-1]
    upload = {"file": ("a.jsonl", b'{"a": 1}\n' * 100)}
    probes: list[tuple[str, Callable[[], Any]]] = [
        ("GET /fine_tuning/jobs?limit=20", lambda: http.get("/v1/fine_tuning/jobs?limit=20")),
        ("GET /fine_tuning/jobs?limit=20&after=<deep>", lambda: http.get(f"/v1/fine_tuning/jobs?limit=20&after={deep}")),
        ("GET /fine_tuning/jobs/{id}", lambda: http.get(f"/v1/fine_tuning/jobs/{last}")),
        ("GET /files?limit=100", lambda: http.get("/v1/files?limit=100")),
        ("GET /files (all of them: OpenAI's default limit)", lambda: http.get("/v1/files")),
        (f"GET /jobs/{{id}}/events?limit=50 ({n_events} events)",
         lambda: http.get(f"/v1/fine_tuning/jobs/{last}/events?limit=50")),
        ("POST /files (1 KB JSONL)", lambda: http.post("/v1/files", data={"purpose": "fine-tune"}, files=upload)),
    ]
    check = http.get("/v1/fine_tuning/jobs?limit=20").json()
    assert len(check["data"]) == 20 and check["has_more"]
    label = f"{scale_jobs:,} jobs / {scale_files:,} files"
    rows: list[list[Any]] = []
    for name, fn in probes:
        med, p95 = _time(fn, reps)
        rows.append([label, name, f"{med:.2f}", f"{p95:.2f}"])
    rows.append([label, f"(filling the store: {fill:.1f} s)", "", ""])
    store.close()
    return rows


def list_latency(n_jobs: int, n_files: int, n_events: int, reps: int) -> None:
    rows = _scale(100, 100, n_events, reps) + _scale(n_jobs, n_files, n_events, reps)
    _table(f"API latency per request, in-process (ms; {reps} reps; the store holds as many rows again for a "
           "second owner)", ["store size (per owner)", "request", "median", "p95"], rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--part", choices=["all", "overhead", "list"], default="all")
    ap.add_argument("--jobs", type=int, default=3, help="jobs measured back-to-back, then as many after idling")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--idle", type=float, default=40, help="seconds between the idle-server jobs")
    ap.add_argument("--n-jobs", type=int, default=10_000)
    ap.add_argument("--n-files", type=int, default=10_000)
    ap.add_argument("--n-events", type=int, default=2_000)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.part in ("all", "list"):
        list_latency(args.n_jobs, args.n_files, args.n_events, args.reps)
    if args.part in ("all", "overhead"):
        job_overhead(args.jobs, args.steps, args.idle)


if __name__ == "__main__":
    main()
