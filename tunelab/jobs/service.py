"""What the Files and Fine-tuning Jobs APIs do, over the store: OpenAI-shaped objects, ownership checks (an
owner never learns that another owner's ids exist: they are 404 like unknown ones), pagination, and the
state changes that requests cause (create, cancel, pause, resume). Training itself is the workers' business;
this module only tells them (`Workers.notify`, `Workers.kill`).

Per-owner limits (`JobsSettings.max_*_per_owner`) are checked here, under a lock per owner so that one
owner's parallel requests cannot slip past them: active jobs (validating, queued or running), uploaded
files and their bytes. Past a limit the answer is 429 `rate_limit_exceeded`, OpenAI's shape.

No torch and no heavy imports: routes call these methods from FastAPI's thread pool.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol

from sqlalchemy import func, select
from sqlalchemy.engine import RowMapping

from tunelab.jobs import hyper
from tunelab.jobs.store import Store, checkpoints, events, files, jobs, new_id, now
from tunelab.server.errors import APIError

if TYPE_CHECKING:
    from tunelab.registry import Registry

log = logging.getLogger(__name__)

PURPOSES = ("fine-tune", "fine-tune-results", "batch", "assistants", "vision", "user_data", "evals")
UPLOAD_PURPOSES = tuple(p for p in PURPOSES if p != "fine-tune-results")
TERMINAL = ("succeeded", "failed", "cancelled")
ACTIVE = ("validating_files", "queued", "running", "paused")
COUNTED = ("validating_files", "queued", "running")  # what max_jobs_per_owner counts (paused jobs hold no worker)


class Workers(Protocol):
    def notify(self) -> None: ...

    def kill(self, job_id: str) -> None: ...


class _NoWorkers:
    def notify(self) -> None:
        return None

    def kill(self, job_id: str) -> None:
        return None


@dataclass
class JobsSettings:
    """Server-side settings of the jobs API."""

    data_dir: Path
    base_model: str
    """What training loads (`model.name`): a built-in name, hub id, folder or .gguf."""
    served_names: tuple[str, ...]
    """Names a job's `model` may use for the base (the name clients see first)."""
    max_upload_bytes: int = 512 * 1024 * 1024
    server_sets: list[tuple[str, Any]] = field(default_factory=list)
    """`--set key=value` overrides applied to every job's RunConfig (e.g. train.max_steps=100)."""
    python: str = ""
    """Interpreter for child processes (default: this one)."""
    max_jobs_per_owner: int = 4
    """Jobs one owner may have validating, queued or running at once (more: 429)."""
    max_files_per_owner: int = 100
    """Uploaded files one owner may keep (result files the server writes do not count)."""
    max_bytes_per_owner: int = 10 * 1024**3
    """Bytes of uploaded files one owner may keep."""
    module_names: frozenset[str] = frozenset()
    """Names `target_modules` may use on the base model (empty: not checked); see hyper.module_suffixes."""
    context_length: int | None = None
    """The base model's context: the largest `max_seq_len` a job may ask for."""


def _not_found(kind: str, id_: str, param: str | None = None) -> APIError:
    return APIError(404, f"No {kind} found with id {id_!r}", param=param, code=f"{kind.replace(' ', '_')}_not_found")


def safe_filename(name: str | None) -> str:
    """The client's file name, kept as metadata only: no directories, no control characters."""
    base = (name or "upload").replace("\\", "/").rsplit("/", 1)[-1]
    base = "".join(c for c in base if c.isprintable()).strip()[:255]
    return base or "upload"


def model_owner(owner: str) -> str:
    # The owner appears inside a model name, between colons: keep it to a safe alphabet.
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in owner) or "anonymous"


class JobsService:
    def __init__(self, store: Store, settings: JobsSettings, *, register: Callable[[str, str, str], str | None]
                 | None = None, registry: Registry | None = None) -> None:
        self.store = store
        self.registry = registry  # where succeeded jobs register their models (None: they are not registered)
        self.settings = settings
        self.workers: Workers = _NoWorkers()
        # register(name, path, owner) -> error message or None; set by the app to serve adapters at once.
        self.register = register or (lambda name, path, owner: None)
        self._owner_locks: dict[str, threading.Lock] = {}
        self._locks_lock = threading.Lock()
        # Owners' data: readable by the server's user alone when we create the folders (see docs/security.md).
        (settings.data_dir / "files").mkdir(mode=0o700, parents=True, exist_ok=True)
        (settings.data_dir / "jobs").mkdir(mode=0o700, parents=True, exist_ok=True)

    def _owner_lock(self, owner: str) -> threading.Lock:
        with self._locks_lock:
            return self._owner_locks.setdefault(owner, threading.Lock())

    # ================================================================== files
    def storage_used(self, owner: str) -> tuple[int, int]:
        """(files, bytes) of the owner's uploads still stored."""
        with self.store.read() as c:
            n, size = c.execute(select(func.count(), func.coalesce(func.sum(files.c.bytes), 0)).where(
                files.c.owner == owner, files.c.deleted.is_(False), files.c.purpose != "fine-tune-results")).one()
        return int(n), int(size)

    def file_path(self, row: RowMapping) -> Path:
        return self.settings.data_dir / "files" / row["storage"]

    @staticmethod
    def file_obj(row: RowMapping) -> dict[str, Any]:
        return {"id": row["id"], "object": "file", "bytes": row["bytes"], "created_at": row["created_at"],
                "filename": row["filename"], "purpose": row["purpose"], "status": row["status"],
                "status_details": None, "expires_at": None}

    def upload(self, owner: str, filename: str | None, purpose: str, src: IO[bytes]) -> dict[str, Any]:
        """Copy an upload (already spooled by the multipart parser) to a generated name, chunk by chunk,
        refusing it past the size limit or the owner's storage quota; `fine-tune` files must be JSONL,
        checked line by line."""
        if purpose not in UPLOAD_PURPOSES:
            raise APIError(400, f"purpose must be one of {', '.join(UPLOAD_PURPOSES)}; got {purpose!r}",
                           param="purpose", code="invalid_value")
        name = safe_filename(filename)
        with self._owner_lock(owner):  # the quota check and the insert are one step per owner
            n_files, used = self.storage_used(owner)
            cfg = self.settings
            if n_files >= cfg.max_files_per_owner:
                raise _over_limit(f"you already store {n_files} files, this server's limit per owner; delete "
                                  "some (DELETE /v1/files/{id}) before uploading more")
            file_id, size = self._copy_upload(src, name, purpose, room=cfg.max_bytes_per_owner - used)
            return self.file_obj(self.store.insert(files, id=file_id, owner=owner, filename=name, purpose=purpose,
                                                   bytes=size, created_at=now(), status="processed",
                                                   storage=file_id, deleted=False))

    def _copy_upload(self, src: IO[bytes], name: str, purpose: str, room: int) -> tuple[str, int]:
        file_id = new_id("file-")
        dest_dir = self.settings.data_dir / "files"
        limit = self.settings.max_upload_bytes
        fd, tmp = tempfile.mkstemp(dir=dest_dir, prefix=".upload-")
        size = 0
        try:
            with os.fdopen(fd, "wb") as out:
                while chunk := src.read(1 << 20):
                    size += len(chunk)
                    if size > limit:
                        raise APIError(413, f"file exceeds this server's upload limit of {limit} bytes",
                                       param="file", code="file_too_large")
                    if size > room:
                        raise _over_limit(f"this upload would take your stored files past this server's limit of "
                                          f"{self.settings.max_bytes_per_owner} bytes per owner; delete some first")
                    out.write(chunk)
            if purpose == "fine-tune":
                check_jsonl(Path(tmp), name)
            os.replace(tmp, dest_dir / file_id)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return file_id, size

    def add_result_file(self, owner: str, filename: str, content: bytes) -> str:
        file_id = new_id("file-")
        dest = self.settings.data_dir / "files" / file_id
        tmp = dest.with_name(".result-" + file_id)
        tmp.write_bytes(content)
        os.replace(tmp, dest)
        self.store.insert(files, id=file_id, owner=owner, filename=filename, purpose="fine-tune-results",
                          bytes=len(content), created_at=now(), status="processed", storage=file_id, deleted=False)
        return file_id

    def _file(self, owner: str, file_id: str, param: str | None = None) -> RowMapping:
        row = self.store.get(files, file_id)
        if row is None or row["owner"] != owner or row["deleted"]:
            raise _not_found("file", file_id, param)
        return row

    def get_file(self, owner: str, file_id: str) -> dict[str, Any]:
        return self.file_obj(self._file(owner, file_id))

    def file_content_path(self, owner: str, file_id: str) -> tuple[Path, str]:
        row = self._file(owner, file_id)
        return self.file_path(row), row["filename"]

    def list_files(self, owner: str, *, purpose: str | None, after: str | None, limit: int,
                   order: str) -> dict[str, Any]:
        where = [files.c.owner == owner, files.c.deleted.is_(False)]
        if purpose:
            where.append(files.c.purpose == purpose)
        rows, more = self.store.page(files, where=where, after=after, limit=_limit(limit, 10_000),
                                     newest_first=order != "asc")
        return _page([self.file_obj(r) for r in rows], more)

    def delete_file(self, owner: str, file_id: str) -> dict[str, Any]:
        row = self._file(owner, file_id)
        with self.store.write() as c:
            c.execute(files.update().where(files.c.id == file_id).values(deleted=True))
        # Jobs train on their own copies, so deleting a file never breaks a job in flight.
        self.file_path(row).unlink(missing_ok=True)
        return {"id": file_id, "object": "file", "deleted": True}

    # ================================================================== jobs: objects
    def job_dir(self, job_id: str) -> Path:
        return self.settings.data_dir / "jobs" / job_id

    @staticmethod
    def job_obj(row: RowMapping) -> dict[str, Any]:
        hp = dict(row["hyperparameters"])
        mtype = row["method"].get("type", "supervised")
        shown_hp = {k: hp.get(k, "auto") for k in ("n_epochs", "batch_size", "learning_rate_multiplier")}
        method_hp = dict(shown_hp)
        if mtype == "dpo":
            method_hp["beta"] = hp.get("beta", "auto")
        meta = {k: v for k, v in (row["job_metadata"] or {}).items()}
        return {
            "id": row["id"], "object": "fine_tuning.job", "created_at": row["created_at"],
            "error": row["error"], "fine_tuned_model": row["fine_tuned_model"], "finished_at": row["finished_at"],
            "hyperparameters": shown_hp, "model": row["model"], "organization_id": row["owner"],
            "result_files": list(row["result_files"] or []), "seed": row["seed"], "status": row["status"],
            "trained_tokens": row["trained_tokens"], "training_file": row["training_file"],
            "validation_file": row["validation_file"], "estimated_finish": row["estimated_finish"],
            "integrations": [], "metadata": meta or None, "user_provided_suffix": row["suffix"],
            "method": {"type": mtype, mtype: {"hyperparameters": method_hp}},
            "tunelab": {"options": row["options"], "step": row["step"], "total_steps": row["total_steps"]},
        }

    def _job(self, owner: str, job_id: str) -> RowMapping:
        row = self.store.get(jobs, job_id)
        if row is None or row["owner"] != owner:
            raise _not_found("fine-tuning job", job_id, "fine_tuning_job_id")
        return row

    def model_name(self, row: RowMapping) -> str:
        return f"ft:{row['model']}:{model_owner(row['owner'])}:{row['suffix'] or ''}:{row['id'].removeprefix('ftjob-')[:8]}"

    # ================================================================== jobs: requests
    def create_job(self, owner: str, req: hyper.JobCreate) -> dict[str, Any]:
        if req.model not in self.settings.served_names:
            raise APIError(400, f"model {req.model!r} cannot be fine-tuned on this server; it trains "
                           f"{', '.join(repr(n) for n in self.settings.served_names)}", param="model",
                           code="model_not_available")
        train = self._file(owner, req.training_file, "training_file")
        valid = self._file(owner, req.validation_file, "validation_file") if req.validation_file else None
        for row, param in ((train, "training_file"), (valid, "validation_file")):
            if row is not None and row["purpose"] != "fine-tune":
                raise APIError(400, f"{param} {row['id']} has purpose {row['purpose']!r}; upload it with "
                               "purpose 'fine-tune'", param=param, code="invalid_file_purpose")
        if req.integrations:
            raise APIError(400, "integrations are not supported by this server", param="integrations",
                           code="unsupported_parameter")
        job_id = new_id("ftjob-")
        jdir = self.job_dir(job_id)
        try:
            opts = hyper.tunelab_options(req)
            hyper.check_against_model(opts, self.settings.module_names, self.settings.context_length)
            hyper.check_reinforcement(req, self.settings.served_names)
            # Resolve once with a placeholder size: every option error surfaces now, as a 400, not later.
            hyper.build_config(base_model=self.settings.base_model, train_path="train.jsonl",
                               valid_path="valid.jsonl" if valid else None, output_dir=str(jdir / "run"), req=req,
                               n_examples=100, server_sets=self.settings.server_sets)
            options = opts.model_dump(exclude_none=True)
        except hyper.OptionError as e:
            raise APIError(400, e.message, param=e.param, code="invalid_value") from None
        with self._owner_lock(owner):  # count and insert together: parallel requests cannot pass the limit
            self._check_job_limit(owner)
            self._insert_job(owner, req, job_id, train, valid, options)
        self.workers.notify()
        return self.get_job(owner, job_id)

    def _check_job_limit(self, owner: str) -> None:
        limit = self.settings.max_jobs_per_owner
        with self.store.read() as c:
            active = int(c.execute(select(func.count()).select_from(jobs).where(
                jobs.c.owner == owner, jobs.c.status.in_(COUNTED))).scalar() or 0)
        if active >= limit:
            raise _over_limit(f"you have {active} jobs validating, queued or running, this server's limit per "
                              "owner; wait for one to finish or cancel one")

    def _insert_job(self, owner: str, req: hyper.JobCreate, job_id: str, train: RowMapping,
                    valid: RowMapping | None, options: dict[str, Any]) -> None:
        jdir = self.job_dir(job_id)
        (jdir / "data").mkdir(parents=True)
        # The job trains on its own copies (hard links when possible): deleting a file never breaks it.
        _link_or_copy(self.file_path(train), jdir / "data" / "train.jsonl")
        if valid is not None:
            _link_or_copy(self.file_path(valid), jdir / "data" / "valid.jsonl")
        (jdir / "request.json").write_text(req.model_dump_json(exclude_none=True))
        hp = hyper.requested_hyperparameters(req).model_dump(exclude_none=True)
        seed = req.seed if req.seed is not None else int.from_bytes(os.urandom(4), "little") % (2**31 - 1)
        method = {"type": hyper.method_type(req)}
        with self.store.write() as c:
            c.execute(jobs.insert().values(
                id=job_id, owner=owner, model=req.model, training_file=train["id"],
                validation_file=valid["id"] if valid is not None else None, status="validating_files",
                created_at=now(), suffix=req.suffix, seed=seed, hyperparameters=hp, method=method,
                job_metadata=req.metadata, options=options, result_files=[], pause_requested=False, step=0,
                metrics_offset=0, last_train_step=0, last_valid_step=-1))
            self.store.add_event(job_id, f"Created fine-tuning job: {job_id}", conn=c)
            self.store.add_event(job_id, f"Validating training file: {train['id']}"
                                 + (f" and validation file: {valid['id']}" if valid is not None else ""), conn=c)

    def get_job(self, owner: str, job_id: str) -> dict[str, Any]:
        return self.job_obj(self._job(owner, job_id))

    def list_jobs(self, owner: str, *, after: str | None, limit: int,
                  metadata: dict[str, str] | None = None) -> dict[str, Any]:
        rows, more = self.store.page(jobs, where=[jobs.c.owner == owner], after=after, limit=_limit(limit, 10_000))
        out = [self.job_obj(r) for r in rows]
        if metadata:
            out = [j for j in out if all((j["metadata"] or {}).get(k) == v for k, v in metadata.items())]
        return _page(out, more)

    def count_jobs(self, owner: str) -> int:
        with self.store.read() as c:
            return int(c.execute(select(func.count()).select_from(jobs).where(jobs.c.owner == owner)).scalar() or 0)

    def cancel(self, owner: str, job_id: str) -> dict[str, Any]:
        row = self._job(owner, job_id)
        if row["status"] in TERMINAL:
            raise APIError(400, f"job {job_id} has already {'finished' if row['status'] != 'cancelled' else 'been cancelled'}"
                           f" (status {row['status']!r})", param="fine_tuning_job_id", code="job_not_cancellable")
        if self.store.update_job(job_id, only_if_status=ACTIVE, status="cancelled", finished_at=now(),
                                 estimated_finish=None, pause_requested=False):
            self.workers.kill(job_id)  # immediate: the child process is killed now, not at a checkpoint
            self.store.add_event(job_id, "Fine-tuning job cancelled")
        return self.get_job(owner, job_id)

    def pause(self, owner: str, job_id: str) -> dict[str, Any]:
        row = self._job(owner, job_id)
        status = row["status"]
        if status in ("validating_files", "queued"):
            if self.store.update_job(job_id, only_if_status=("queued", "validating_files"), status="paused",
                                     pause_requested=False):
                self.store.add_event(job_id, "Fine-tuning job paused before training started")
        elif status == "running":
            if not row["pause_requested"]:
                self.store.update_job(job_id, pause_requested=True)
                self.store.add_event(job_id, "Pause requested: the job stops at its next checkpoint")
        elif status != "paused":
            raise APIError(400, f"job {job_id} cannot be paused: its status is {status!r}",
                           param="fine_tuning_job_id", code="job_not_pausable")
        return self.get_job(owner, job_id)

    def resume(self, owner: str, job_id: str) -> dict[str, Any]:
        row = self._job(owner, job_id)
        if row["status"] == "running" and row["pause_requested"]:
            self.store.update_job(job_id, pause_requested=False)  # changed our mind before the checkpoint
            self.store.add_event(job_id, "Pause withdrawn")
        elif row["status"] != "paused":
            raise APIError(400, f"job {job_id} is not paused (status {row['status']!r})",
                           param="fine_tuning_job_id", code="job_not_paused")
        else:
            # A job paused before validation finished goes back to validation; else to the queue.
            validated = (self.job_dir(job_id) / "config.yaml").exists()
            to = "queued" if validated else "validating_files"
            with self._owner_lock(owner):  # a resumed job counts again
                self._check_job_limit(owner)
                if self.store.update_job(job_id, only_if_status=("paused",), status=to, pause_requested=False):
                    self.store.add_event(job_id, "Fine-tuning job resumed")
        self.workers.notify()
        return self.get_job(owner, job_id)

    def list_events(self, owner: str, job_id: str, *, after: str | None, limit: int) -> dict[str, Any]:
        self._job(owner, job_id)
        rows, more = self.store.page(events, where=[events.c.job_id == job_id], after=after,
                                     limit=_limit(limit, 10_000))
        data = [{"id": r["id"], "object": "fine_tuning.job.event", "created_at": r["created_at"],
                 "level": r["level"], "message": r["message"], "data": r["data"], "type": r["type"]} for r in rows]
        return _page(data, more)

    def list_checkpoints(self, owner: str, job_id: str, *, after: str | None, limit: int) -> dict[str, Any]:
        self._job(owner, job_id)
        rows, more = self.store.page(checkpoints, where=[checkpoints.c.job_id == job_id], after=after,
                                     limit=_limit(limit, 10_000))
        data = [{"id": r["id"], "object": "fine_tuning.job.checkpoint", "created_at": r["created_at"],
                 "fine_tuned_model_checkpoint": r["model_name"], "fine_tuning_job_id": job_id,
                 "metrics": r["metrics"], "step_number": r["step_number"]} for r in rows]
        out = _page(data, more)
        out["first_id"] = data[0]["id"] if data else None
        out["last_id"] = data[-1]["id"] if data else None
        return out

    # ================================================================== models
    def owns_model(self, owner: str, model: str) -> bool | None:
        """For an `ft:` name made here: whether `owner` owns it; None when the name is not one of ours."""
        if not model.startswith("ft:"):
            return None
        with self.store.read() as c:
            job_owner = c.execute(select(jobs.c.owner).where(jobs.c.fine_tuned_model == model)).scalar()
            if job_owner is None:
                job_owner = c.execute(select(jobs.c.owner).join(checkpoints, checkpoints.c.job_id == jobs.c.id)
                                      .where(checkpoints.c.model_name == model)).scalar()
        return None if job_owner is None else job_owner == owner


    # ================================================================== registry
    @staticmethod
    def registry_name(row: RowMapping) -> str:
        """A job's registry name, from its `ft:` id less the owner (the registry is per owner):
        ft:tiny:alice:notes:abcd1234 -> ft-tiny-notes-abcd1234."""
        parts = [str(row["model"])[-48:], str(row["suffix"] or "")[:40], row["id"].removeprefix("ftjob-")[:8]]
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", "ft-" + "-".join(p for p in parts if p))
        return re.sub(r"\.{2,}", ".", name).strip("-.")

    def register_job_model(self, row: RowMapping) -> tuple[str, str] | None:
        """Register a succeeded job in its owner's registry: each checkpoint a version, in step order, the final
        model last, with the `production` alias on it. Returns (event message, level), None with no registry."""
        from tunelab.registry import RegistryError, registry_owner

        if self.registry is None:
            return None
        name, owner = self.registry_name(row), registry_owner(row["owner"])
        by_step = {int(r["step_number"]): r for r in self.store.checkpoints_of(row["id"])}  # the final row wins
        run = self.job_dir(row["id"]) / "run"
        try:
            last = None
            for step in sorted(by_step):
                ck = by_step[step]
                last = self.registry.add(
                    name, run, owner=owner, weights=ck["path"], created_by=row["owner"],
                    extra_lineage={"fine_tuning_job": row["id"], "fine_tuned_model": ck["model_name"], "step": step})
            if last is None:
                return None
            self.registry.promote(name, last.version, owner=owner, by=row["owner"])
        except (RegistryError, OSError) as e:
            log.warning("registering job %s failed: %s", row["id"], e)
            return f"The model could not be added to the model registry: {e}", "warn"
        return (f"Registered in the model registry as {name} ({len(by_step)} version(s); {name}@production is "
                f"{last.ref})", "info")


def _over_limit(message: str) -> APIError:
    return APIError(429, message, code="rate_limit_exceeded", type="requests")


def _limit(limit: int, cap: int) -> int:
    if limit < 1:
        raise APIError(400, "limit must be at least 1", param="limit", code="invalid_value")
    return min(limit, cap)


def _page(data: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {"object": "list", "data": data, "has_more": more}


def _link_or_copy(src: Path, dest: Path) -> None:
    try:
        os.link(src, dest)
    except OSError:
        shutil.copyfile(src, dest)


def check_jsonl(path: Path, name: str) -> None:
    """Fine-tune uploads must be JSONL: every non-blank line one JSON object, at least one line. Deeper checks
    (roles, tokens) run when a job validates the file with the model's tokenizer. Any failure here is a 400
    naming the line, whatever the parser raised (a line nested 60,000 deep exhausts its recursion)."""
    seen = 0
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                obj = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise _bad_line(name, lineno, f"not valid JSON ({e}); fine-tune files must be JSONL, one JSON "
                                "object per line") from None
            except RecursionError:
                raise _bad_line(name, lineno, "nested too deeply to be a training example") from None
            except Exception as e:  # anything else the parser raises is still this line's fault
                log.warning("%s line %d: JSON parser raised %s", name, lineno, type(e).__name__)
                raise _bad_line(name, lineno, "not valid JSON") from None
            if not isinstance(obj, dict):
                raise _bad_line(name, lineno, f"expected a JSON object, got {type(obj).__name__}")
            seen += 1
    if not seen:
        raise APIError(400, f"{name}: the file is empty; fine-tune files need at least one JSON object line",
                       param="file", code="invalid_file_format")


def _bad_line(name: str, lineno: int, why: str) -> APIError:
    return APIError(400, f"{name}, line {lineno}: {why}", param="file", code="invalid_file_format")
