"""Workers: validate and train jobs in child processes, and turn what the children write into API state.

One validator thread takes jobs in `validating_files` (a short child that checks the files with the base
model's tokenizer, then resolves "auto" hyperparameters); N trainer threads each claim one `queued` job at a
time (an atomic compare-and-set in SQL) and run `python -m tunelab.jobs.child train` in its own process
group. While the child runs, its trainer thread harvests metrics.jsonl into events and new checkpoints into
servable checkpoint models, and watches for cancel (kill now), pause (kill right after the next checkpoint)
and server shutdown (kill; the job stays `running` and resumes on restart).

Fair across owners: validation and training each take the next job round-robin by owner (the owner with the
fewest running jobs, then the one served longest ago, then the oldest job), never one global first-in
first-out queue, so ten jobs queued by one owner delay another owner's job by at most one turn.

Restart recovery (`start`): jobs left `running` go back to `queued` and resume from their last checkpoint
(the training loop's exact resume); a stale child still alive is killed first; finished models and
checkpoints are registered with the engine again. Events, files and models all live in the store/data dir.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import select
from sqlalchemy.engine import RowMapping

from tunelab.jobs import hyper
from tunelab.jobs.child import export_checkpoint, weights_in
from tunelab.jobs.harvest import Cursor, Event, checkpoint_metrics, read_metrics, result_csv
from tunelab.jobs.service import JobsService
from tunelab.jobs.store import checkpoints, jobs, new_id, now
from tunelab.rundir import RunDir, parse_step

log = logging.getLogger(__name__)


@dataclass
class _Running:
    job_id: str
    proc: subprocess.Popen[bytes]
    started: float
    start_step: int
    killed: str | None = None  # why we killed it: cancel | pause | shutdown
    pause_seen_ckpts: int | None = None
    metrics_by_step: dict[int, dict[str, Any]] = field(default_factory=dict)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL does not wait on the child
        log.error("child %s did not exit after SIGKILL", proc.pid)


def _pid_is_our_child(pid: int) -> bool:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"tunelab.jobs.child" in cmdline


class _ReadLine:
    """Waits for one answer line from a warm validator without blocking the caller's polling loop."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self._got = threading.Event()
        self._proc = proc
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        try:
            self._proc.stdout.readline()
        except (OSError, ValueError):
            pass
        self._got.set()

    def done(self) -> bool:
        return self._got.is_set()


class WorkerPool:
    def __init__(self, service: JobsService, n_workers: int = 1, poll_s: float = 0.25) -> None:
        if n_workers < 1:
            raise ValueError("n_workers must be at least 1")
        self.service = service
        self.store = service.store
        self.n_workers = n_workers
        self.poll_s = poll_s
        self.python = service.settings.python or sys.executable
        self._wake = threading.Condition()
        self._stop = threading.Event()
        self._running: dict[str, _Running] = {}
        self._lock = threading.Lock()
        self._threads: list[threading.Thread] = []
        self._claim_lock = threading.Lock()
        self._turn = 0
        self._last_turn: dict[tuple[str, str], int] = {}  # (queue status, owner) -> when it was last served
        self._spares: dict[str, subprocess.Popen[bytes]] = {}
        self._validator_proc: subprocess.Popen[bytes] | None = None
        service.workers = self

    # ------------------------------------------------------------------ control
    def start(self, warm: bool = True) -> None:
        self.recover()
        self._warm = warm
        self._threads = [threading.Thread(target=self._validator, name="jobs-validator", daemon=True)]
        self._threads += [threading.Thread(target=self._trainer, name=f"jobs-worker-{i}", daemon=True)
                          for i in range(self.n_workers)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """Stop taking jobs and kill running children; their jobs stay `running` and resume on restart."""
        self._stop.set()
        with self._lock:
            for r in self._running.values():
                r.killed = r.killed or "shutdown"
                _kill_group(r.proc)
            spares = list(self._spares.values())
            self._spares.clear()
        for p in spares:
            _kill_group(p)
        self._drop_validator()
        self.notify()
        for t in self._threads:
            t.join(timeout=30)

    def notify(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def kill(self, job_id: str) -> None:
        with self._lock:
            r = self._running.get(job_id)
            if r is not None:
                r.killed = "cancel"
                _kill_group(r.proc)

    def _sleep(self) -> None:
        with self._wake:
            self._wake.wait(timeout=1.0)

    # ------------------------------------------------------------------ warm children
    def _spawn(self, mode: str) -> subprocess.Popen[bytes]:
        return subprocess.Popen([self.python, "-m", "tunelab.jobs.child", mode], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE if mode == "validate" else subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, start_new_session=True)

    def _keep_spare(self) -> None:
        """Each trainer thread keeps one idle child that has already imported torch and friends."""
        name = threading.current_thread().name
        with self._lock:
            spare = self._spares.get(name)
            if spare is None or spare.poll() is not None:
                self._spares[name] = self._spawn("train")

    def _take_spare(self) -> subprocess.Popen[bytes]:
        name = threading.current_thread().name
        with self._lock:
            spare = self._spares.pop(name, None)
        if spare is None or spare.poll() is not None:
            spare = self._spawn("train")
        return spare

    def _validator_child(self) -> subprocess.Popen[bytes]:
        with self._lock:
            if self._validator_proc is None or self._validator_proc.poll() is not None:
                self._validator_proc = self._spawn("validate")
            return self._validator_proc

    def _drop_validator(self) -> None:
        with self._lock:
            proc, self._validator_proc = self._validator_proc, None
        if proc is not None:
            _kill_group(proc)

    # ------------------------------------------------------------------ recovery
    def recover(self) -> None:
        for row in self.store.jobs_in("running"):
            if row["pid"] and _pid_is_our_child(row["pid"]):
                try:
                    os.killpg(row["pid"], signal.SIGKILL)
                except OSError:
                    pass
            to = "paused" if row["pause_requested"] else "queued"
            self.store.update_job(row["id"], only_if_status=("running",), status=to, pid=None,
                                  pause_requested=False, estimated_finish=None)
            steps = [c.step for c in RunDir(self.service.job_dir(row["id"]) / "run").checkpoints()]
            where = f"its last checkpoint (step {steps[-1]})" if steps else "the start (no checkpoint was written)"
            self.store.add_event(row["id"], f"The server restarted; the job {'is paused' if to == 'paused' else 'resumes'}"
                                 f" from {where}", level="warn")
        for row in self.store.jobs_in("succeeded", "running", "queued", "paused"):
            for ck_row in self.store.checkpoints_of(row["id"]):
                self._serve(ck_row["model_name"], ck_row["path"], row)
            weights = weights_in(self.service.job_dir(row["id"]) / "run")
            if row["status"] == "succeeded" and row["fine_tuned_model"] and weights.is_dir():
                self._serve(row["fine_tuned_model"], str(weights), row)

    def _serve(self, name: str, path: str, row: RowMapping) -> None:
        problem = self._try_serve(name, path, row)
        if problem:
            self.store.add_event(row["id"], problem, level="warn")

    def _try_serve(self, name: str, path: str, row: RowMapping) -> str | None:
        """Register a model with the engine; what went wrong, as an event message, or None."""
        if not (Path(path) / "adapter_config.json").is_file() and (Path(path) / "config.json").is_file():
            # finetune: full produces a whole model; this server holds one base model and swaps adapters.
            return (f"{name} is a full fine-tuned model, not an adapter: serve it on its own with "
                    f"`tunelab serve --model {path}`")
        err = self.service.register(name, path, row["owner"])
        return f"Could not serve {name}: {err}" if err else None

    # ------------------------------------------------------------------ validation
    def _validator(self) -> None:
        if self._warm:
            self._validator_child()
        while not self._stop.is_set():
            pending = self._fair_order("validating_files")
            if not pending:
                self._sleep()
                continue
            self._served("validating_files", pending[0]["owner"])
            try:
                self._validate(pending[0])
            except Exception:  # a bug here must not stop validation of other jobs
                log.exception("validating %s failed", pending[0]["id"])
                self._fail(pending[0]["id"], "internal_error", "file validation failed inside the server; its log "
                           f"has the details (job {pending[0]['id']})", None, ("validating_files",))

    def _validate(self, row: RowMapping) -> None:
        job_id = row["id"]
        jdir = self.service.job_dir(job_id)
        req = hyper.JobCreate.model_validate_json((jdir / "request.json").read_text())
        has_valid = (jdir / "data" / "valid.jsonl").exists()
        settings = self.service.settings
        probe, _ = hyper.build_config(base_model=settings.base_model, train_path=str(jdir / "data" / "train.jsonl"),
                                      valid_path=str(jdir / "data" / "valid.jsonl") if has_valid else None,
                                      output_dir=str(jdir / "run"), req=req, n_examples=100,
                                      server_sets=settings.server_sets)
        (jdir / "probe.yaml").write_text(yaml.safe_dump(probe.model_dump(mode="json"), sort_keys=False))
        labels = {"train.jsonl": f"training file {row['training_file']}"}
        if has_valid:
            labels["valid.jsonl"] = f"validation file {row['validation_file']}"
        (jdir / "spec.json").write_text(json.dumps({"files": labels}))
        (jdir / "validate.json").unlink(missing_ok=True)
        proc = self._validator_child()
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(f"{jdir}\n".encode())
            proc.stdin.flush()
        except OSError:
            pass  # it died; the missing validate.json below reports it
        answered = _ReadLine(proc)
        while not answered.done():
            if self._stop.is_set() or self.store.get(jobs, job_id)["status"] != "validating_files":  # type: ignore[index]
                self._drop_validator()
                return
            if proc.poll() is not None:
                self._drop_validator()
                break
            time.sleep(self.poll_s / 2)
        try:
            result = json.loads((jdir / "validate.json").read_text())
        except (OSError, json.JSONDecodeError):
            result = {"ok": False, "code": "internal_error", "param": None,
                      "message": f"file validation crashed (exit code {proc.poll()}): {_tail(jdir / 'child.log')}"}
        if not result["ok"]:
            self._fail(job_id, result["code"], result["message"], result.get("param"), ("validating_files",))
            return
        n = int(result["n_examples"])
        cfg, resolved = hyper.build_config(base_model=settings.base_model, train_path=str(jdir / "data" / "train.jsonl"),
                                           valid_path=str(jdir / "data" / "valid.jsonl") if has_valid else None,
                                           output_dir=str(jdir / "run"), req=req, n_examples=n,
                                           server_sets=settings.server_sets)
        tmp = jdir / "config.yaml.tmp"
        tmp.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
        os.replace(tmp, jdir / "config.yaml")
        for w in result.get("warnings", []):
            self.store.add_event(job_id, w, level="warn")
        if self.store.update_job(job_id, only_if_status=("validating_files",), status="queued",
                                 hyperparameters={**row["hyperparameters"], **resolved},
                                 total_steps=hyper.total_steps(cfg, n)):
            self.store.add_event(job_id, f"Files validated ({n} training examples); moving job to queued state. "
                                 f"Hyperparameters: {json.dumps(resolved)}")
            self.notify()

    def _fail(self, job_id: str, code: str, message: str, param: str | None, from_status: tuple[str, ...]) -> None:
        if self.store.update_job(job_id, only_if_status=from_status, status="failed", finished_at=now(),
                                 estimated_finish=None, pid=None,
                                 error={"code": code, "message": message, "param": param}):
            self.store.add_event(job_id, message, level="error")

    # ------------------------------------------------------------------ training
    def _fair_order(self, status: str) -> list[RowMapping]:
        """Each owner's oldest job in `status`, in the order they should be served: fewest running jobs first,
        then the owner served longest ago, then the oldest job."""
        busy = self.store.count_by_owner("running") if status == "queued" else {}
        heads = self.store.queue_heads(status)
        return sorted(heads, key=lambda r: (busy.get(r["owner"], 0), self._last_turn.get((status, r["owner"]), -1),
                                            r["seq"]))

    def _served(self, status: str, owner: str) -> None:
        self._turn += 1
        self._last_turn[(status, owner)] = self._turn

    def _claim(self) -> RowMapping | None:
        with self._claim_lock:
            for row in self._fair_order("queued"):
                if self.store.update_job(row["id"], only_if_status=("queued",), status="running",
                                         started_at=row["started_at"] or now(), pause_requested=False):
                    self._served("queued", row["owner"])
                    return self.store.get(jobs, row["id"])
        return None

    def _trainer(self) -> None:
        if self._warm:
            self._keep_spare()
        while not self._stop.is_set():
            row = self._claim()
            if row is None:
                self._sleep()
                continue
            try:
                self._train(row)
            except Exception:
                log.exception("job %s: worker error", row["id"])
                self._fail(row["id"], "internal_error", "the server failed while running this job; its log has the "
                           f"details (job {row['id']})", None, ("running",))

    def _train(self, row: RowMapping) -> None:
        job_id = row["id"]
        jdir = self.service.job_dir(job_id)
        rd = RunDir(jdir / "run")
        last = rd.latest_checkpoint()
        start_step = last.step if last is not None else 0
        self.store.add_event(job_id, "Fine-tuning job started" if not start_step and not row["step"]
                             else f"Fine-tuning job resumed from checkpoint at step {start_step}")
        (jdir / "result.json").unlink(missing_ok=True)
        if not start_step:
            # With no checkpoint the child starts over and rewrites metrics.jsonl: remove it before the child
            # starts so we read the new one from byte 0. Steps already reported are still skipped
            # (last_train_step), so no event is repeated.
            rd.metrics_path.unlink(missing_ok=True)
            self.store.update_job(job_id, metrics_offset=0)
        elif rd.drop_metrics_after(start_step):
            # The child drops the rows after its checkpoint (they are logged again); do it here, before it
            # starts, so the byte offset read so far still falls on a line of the shorter file.
            size = rd.metrics_path.stat().st_size
            if row["metrics_offset"] > size:
                self.store.update_job(job_id, metrics_offset=size)
        proc = self._take_spare()
        if self._warm and not self._stop.is_set():
            # The next job's child warms up now, while this one trains: back-to-back jobs then skip the imports.
            self._keep_spare()
        assert proc.stdin is not None
        try:
            proc.stdin.write(f"{jdir}\n".encode())
            proc.stdin.close()
        except OSError:
            pass  # it died while idle; its exit without result.json fails the job with the log's tail
        run = _Running(job_id, proc, time.time(), start_step)
        with self._lock:
            self._running[job_id] = run
        self.store.update_job(job_id, pid=proc.pid)
        cfg = yaml.safe_load((jdir / "config.yaml").read_text())
        try:
            while proc.poll() is None:
                self._harvest(run, cfg)
                self._control(run)
                if (jdir / "result.json").exists():
                    # The child's work is done once its result is written: don't wait for the interpreter's
                    # teardown (seconds with torch loaded).
                    if not _wait_quietly(proc, 2):
                        _kill_group(proc)
                    break
                time.sleep(self.poll_s)
            self._harvest(run, cfg, final=True)
        finally:
            with self._lock:
                self._running.pop(job_id, None)
        self._finish(run, jdir)

    def _control(self, run: _Running) -> None:
        row = self.store.get(jobs, run.job_id)
        assert row is not None
        if row["status"] != "running":  # cancelled by a request (kill() normally got there first)
            run.killed = run.killed or "cancel"
            _kill_group(run.proc)
        elif self._stop.is_set():
            run.killed = "shutdown"
            _kill_group(run.proc)
        elif row["pause_requested"]:
            n = len(self.store.checkpoints_of(run.job_id))
            if run.pause_seen_ckpts is None:
                run.pause_seen_ckpts = n
                total, every = row["total_steps"] or 0, self._save_every(run.job_id)
                next_ckpt = (row["step"] // every + 1) * every if every else None
                if next_ckpt is None or next_ckpt >= total:  # no checkpoint ahead: stop now
                    run.killed = "pause"
                    _kill_group(run.proc)
            elif n > run.pause_seen_ckpts:
                run.killed = "pause"
                _kill_group(run.proc)

    def _save_every(self, job_id: str) -> int | None:
        cfg = yaml.safe_load((self.service.job_dir(job_id) / "config.yaml").read_text())
        every = cfg["train"].get("save_every")
        return int(every) if every else None

    def _finish(self, run: _Running, jdir: Path) -> None:
        job_id = run.job_id
        row = self.store.get(jobs, job_id)
        assert row is not None
        if run.killed == "shutdown" or row["status"] != "running":
            return  # stays running for recovery, or was cancelled
        if run.killed == "pause":
            if self.store.update_job(job_id, only_if_status=("running",), status="paused", pause_requested=False,
                                     pid=None, estimated_finish=None):
                self.store.add_event(job_id, f"Fine-tuning job paused at step {row['step']}; resume continues "
                                     "from its last checkpoint")
            return
        try:
            result = json.loads((jdir / "result.json").read_text())
        except (OSError, json.JSONDecodeError):
            result = {"ok": False, "code": "training_crashed", "param": None,
                      "message": f"training process exited with code {run.proc.returncode}: {_tail(jdir / 'child.log')}"}
        if not result["ok"]:
            self._fail(job_id, result["code"], result["message"], result.get("param"), ("running",))
            return
        self._succeed(run, row, result, jdir)

    def _succeed(self, run: _Running, row: RowMapping, result: dict[str, Any], jdir: Path) -> None:
        job_id = row["id"]
        name = self.service.model_name(row)
        weights = weights_in(jdir / "run")
        step = int(result.get("step") or row["step"])
        metrics = checkpoint_metrics(run.metrics_by_step, step)
        self._add_checkpoint(row, step, weights, metrics)
        csv_bytes = result_csv(RunDir(jdir / "run").metrics_path)
        result_id = self.service.add_result_file(row["owner"], "step_metrics.csv", csv_bytes)
        problem = self._try_serve(name, str(weights), row)  # before `succeeded`: a client may call it at once
        registered = self.service.register_job_model(row)  # likewise its registry name
        if not self.store.update_job(job_id, only_if_status=("running",), status="succeeded", finished_at=now(),
                                     fine_tuned_model=name, trained_tokens=int(result.get("tokens_seen") or 0),
                                     result_files=[result_id], estimated_finish=None, pid=None, step=step):
            return
        self.store.add_event(job_id, f"New fine-tuned model created: {name}")
        if problem:
            self.store.add_event(job_id, problem, level="warn")
        if registered:
            self.store.add_event(job_id, registered[0], level=registered[1])
        self.store.add_event(job_id, "The job has successfully completed")

    # ------------------------------------------------------------------ harvesting
    def _harvest(self, run: _Running, cfg: dict[str, Any], final: bool = False) -> None:
        row = self.store.get(jobs, run.job_id)
        assert row is not None
        path = RunDir(self.service.job_dir(run.job_id) / "run").metrics_path
        if path.exists():
            self._harvest_metrics(run, row, path, cfg, final)
        self._harvest_checkpoints(run, self.store.get(jobs, run.job_id) or row, final)

    def _harvest_metrics(self, run: _Running, row: RowMapping, path: Path, cfg: dict[str, Any], final: bool) -> None:
        total = row["total_steps"] or 0
        cursor = Cursor(row["metrics_offset"], row["last_train_step"], row["last_valid_step"])
        new_events, after = read_metrics(path, cursor, total=total, has_valid=bool(cfg["data"].get("validation")),
                                         eval_every=cfg["train"].get("eval_every"), final=final)
        if after == cursor and not new_events:
            return
        if cfg.get("method") == "grpo":
            new_events = with_rewards(path, cursor.offset, after.offset, new_events)
        for ev in new_events:
            if ev.type == "metrics" and ev.data is not None:
                run.metrics_by_step.setdefault(int(ev.data["step"]), {}).update(ev.data)
        values: dict[str, Any] = {"metrics_offset": after.offset, "last_train_step": after.last_train,
                                  "last_valid_step": after.last_valid, "step": max(row["step"], after.last_train)}
        done_now = after.last_train - run.start_step
        if done_now > 0 and total:
            rate = (time.time() - run.started) / done_now
            values["estimated_finish"] = int(time.time() + rate * max(0, total - after.last_train))
        with self.store.write() as c:
            # Checked inside the write: once a cancel has committed, steps the killed child logged but we had not
            # read yet are dropped, so a cancelled job's events end at the cancellation.
            if c.execute(select(jobs.c.status).where(jobs.c.id == run.job_id)).scalar() != "running":
                return
            for ev in new_events:
                self.store.add_event(run.job_id, ev.message, level=ev.level, type=ev.type, data=ev.data, conn=c)
            c.execute(jobs.update().where(jobs.c.id == run.job_id).values(**values))

    def _harvest_checkpoints(self, run: _Running, row: RowMapping, final: bool = False) -> None:
        jdir = self.service.job_dir(run.job_id)
        exported = jdir / "checkpoints"
        if final:
            # The child exports each checkpoint before the loop rotates it away (child.export_checkpoint). One
            # committed but not yet exported -- the child was killed in between -- is exported here, once the
            # child is gone, so the two never write the same folder.
            for ck in RunDir(jdir / "run").checkpoints():
                if not (exported / ck.path.name).exists():
                    try:
                        export_checkpoint(ck.path, exported)
                    except (OSError, shutil.Error):
                        continue
        if not exported.is_dir():
            return
        known = {r["step_number"] for r in self.store.checkpoints_of(run.job_id)}
        for d in sorted(exported.iterdir()):  # .tmp-* folders are exports in progress
            step = parse_step(d.name)
            if step is not None and step not in known:
                self._add_checkpoint(row, step, d, checkpoint_metrics(run.metrics_by_step, step))

    def _add_checkpoint(self, row: RowMapping, step: int, path: Path, metrics: dict[str, Any]) -> None:
        name = f"{self.service.model_name(row)}:ckpt-step-{step}"
        with self.store.write() as c:
            c.execute(checkpoints.insert().values(id=new_id("ftckpt-"), job_id=row["id"], created_at=now(),
                                                  step_number=step, model_name=name, metrics=metrics, path=str(path)))
            self.store.add_event(row["id"], f"Checkpoint created at step {step}: {name}", conn=c)
        self._serve(name, str(path), row)


def with_rewards(path: Path, start: int, end: int, events: list[Event]) -> list[Event]:
    """A reinforcement job's events with OpenAI's reward fields: each metrics event gets `train_reward_mean`
    (and `valid_reward_mean` / `full_valid_reward_mean` at validation steps) from the metrics lines it was made
    of (bytes start..end of metrics.jsonl), and its message the mean rewards; the baseline reports the base
    model's validation reward, not a loss it does not have."""
    with path.open("rb") as f:
        f.seek(start)
        blob = f.read(max(0, end - start))
    train: dict[int, float] = {}
    valid: dict[int, float] = {}
    for line in blob.splitlines():
        try:
            m = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(m, dict):
            continue
        step = int(m.get("step", 0) or 0)
        if "train_reward" in m:
            train[step] = float(m["train_reward"])
        elif "valid_reward" in m:
            valid[step] = float(m["valid_reward"])
    out = []
    for ev in events:
        if ev.message.startswith("Baseline") and 0 in valid:
            ev = replace(ev, message=f"Baseline (before training): validation mean reward={valid[0]:.4f}")
        elif ev.type == "metrics" and ev.data is not None:
            step = int(ev.data["step"])
            data = dict(ev.data)
            msg = ev.message
            if step in train:
                data["train_reward_mean"] = train[step]
                msg += f", mean reward={train[step]:.4f}"
            if step in valid:
                data.update(valid_reward_mean=valid[step], full_valid_reward_mean=valid[step])
                msg += f", validation mean reward={valid[step]:.4f}"
            ev = replace(ev, message=msg, data=data)
        out.append(ev)
    return out


def _wait_quietly(proc: subprocess.Popen[bytes], seconds: float) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _tail(path: Path, n: int = 800) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return text[-n:].strip()
