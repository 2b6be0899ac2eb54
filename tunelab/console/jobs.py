"""Jobs page: create a fine-tuning job (the API's `JobCreate`, checked by the same `JobsService.create_job`), list
them, and one job's live view: status and loss curves fed by server-sent events from the job's events table
(the page never polls), baseline line, best step, cancel/pause/resume, checkpoints, the run's HTML report, and
registering a succeeded run in the model registry.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response, StreamingResponse
from pydantic import BaseModel, Field

from tunelab.console.app import not_found, page
from tunelab.console.session import current, signed_in
from tunelab.jobs.hyper import JobCreate
from tunelab.jobs.service import TERMINAL, JobsService
from tunelab.jobs.store import events
from tunelab.server.auth import Principal
from tunelab.server.errors import APIError

router = APIRouter()
Who = Depends(signed_in)
STREAM_POLL_S = 0.5  # how often the event stream looks for new rows (server side; the browser just listens)
STREAM_MAX_S = 6 * 3600  # a stream ends after this; EventSource reconnects with Last-Event-ID


def service(request: Request) -> JobsService:
    svc: JobsService | None = getattr(request.app.state, "jobs", None)
    if svc is None:
        raise APIError(404, "the jobs API is off on this server (started with --no-jobs)", code="jobs_off")
    return svc


def _owner(request: Request) -> str | None:
    who = current(request).principal
    return who.owner if who is not None else None


@router.get("/jobs", response_class=HTMLResponse)
def jobs_page(request: Request) -> Response:
    owner = _owner(request)
    svc = getattr(request.app.state, "jobs", None)
    if owner is None or svc is None:
        return page(request, "jobs.html", "Jobs", jobs=[], files=[], models=[])
    listed = svc.list_jobs(owner, after=None, limit=100)["data"]
    files = svc.list_files(owner, purpose="fine-tune", after=None, limit=1000, order="desc")["data"]
    return page(request, "jobs.html", "Jobs", jobs=listed, files=files, models=list(svc.settings.served_names))


@router.post("/api/jobs")
def create_job(body: JobCreate, request: Request, who: Principal = Who) -> dict[str, Any]:
    return service(request).create_job(who.owner, body)


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(job_id: str, request: Request) -> Response:
    owner = _owner(request)
    if owner is None:
        return page(request, "job.html", "Job")
    svc = service(request)
    try:
        job = svc.get_job(owner, job_id)
    except APIError as e:
        return not_found(request, e.message)
    ckpts = svc.list_checkpoints(owner, job_id, after=None, limit=1000)["data"]
    report = (svc.job_dir(job_id) / "run" / "metrics.jsonl").is_file()
    return page(request, "job.html", f"Job {job_id}", job=job, checkpoints=ckpts, has_report=report,
                terminal=job["status"] in TERMINAL)


@router.get("/jobs/{job_id}/report", response_class=HTMLResponse)
def job_report(job_id: str, request: Request, who: Principal = Who) -> Response:
    """The run's HTML report (`tunelab report`), rendered from the job's run folder as it is now."""
    from tunelab.eval.report import render

    svc = service(request)
    svc.get_job(who.owner, job_id)  # 404 unless it is this owner's job
    run = svc.job_dir(job_id) / "run"
    if not (run / "metrics.jsonl").is_file():
        raise APIError(404, f"job {job_id} has no run folder yet (it has not started training)", code="not_found")
    return HTMLResponse(render(run))


class Register(BaseModel):
    name: str = Field(min_length=1, max_length=100)


@router.post("/api/jobs/{job_id}/register")
def register_job(job_id: str, body: Register, request: Request, who: Principal = Who) -> dict[str, Any]:
    """Register a succeeded job's run as the next version of a registry name (lineage: the job id)."""
    from tunelab.console.models import call_registry, registry, registry_owner

    svc = service(request)
    job = svc.get_job(who.owner, job_id)
    if job["status"] != "succeeded":
        raise APIError(400, f"job {job_id} has status {job['status']!r}; only a succeeded job can be registered",
                       param="fine_tuning_job_id", code="job_not_succeeded")
    v = call_registry(registry(request).add, body.name, svc.job_dir(job_id) / "run", owner=registry_owner(who),
               created_by=who.owner, source=job_id, extra_metrics={"fine_tuned_model": job["fine_tuned_model"]})
    return v.to_dict()


# ---------------------------------------------------------------------------------------------- live events
def _events_after(svc: JobsService, job_id: str, after: str | None) -> list[dict[str, Any]]:
    rows, _ = svc.store.page(events, where=[events.c.job_id == job_id], after=after, limit=500, newest_first=False)
    return [{"id": r["id"], "created_at": r["created_at"], "level": r["level"], "type": r["type"],
             "message": r["message"], "data": r["data"]} for r in rows]


def _sse(event: str, data: Any, id_: str | None = None) -> str:
    head = f"id: {id_}\n" if id_ else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n"


@router.get("/api/jobs/{job_id}/stream")
async def job_stream(job_id: str, request: Request, who: Principal = Who) -> StreamingResponse:
    """Server-sent events: every job event in order (`event: job-event`, id = the event id, so a reconnect with
    Last-Event-ID continues where it stopped), the job object whenever it changes (`event: job`), its
    checkpoints when there are new ones (`event: checkpoints`), and `end` once the job is finished and every
    event has been sent."""
    svc = service(request)
    first = await run_in_threadpool(svc.get_job, who.owner, job_id)  # 404 before the stream starts
    last = request.headers.get("last-event-id") or None

    async def stream() -> AsyncIterator[str]:
        nonlocal last
        shown: dict[str, Any] | None = None
        job = first
        n_ckpts = -1
        started = time.monotonic()
        yield "retry: 2000\n\n"
        while time.monotonic() - started < STREAM_MAX_S:
            new = await run_in_threadpool(_events_after, svc, job_id, last)
            for ev in new:
                last = ev["id"]
                yield _sse("job-event", ev, ev["id"])
            changed = job != shown
            if changed:
                shown = job
                yield _sse("job", job)
            if new or changed:  # checkpoints only appear with new events or a change of the job
                ckpts = (await run_in_threadpool(svc.list_checkpoints, who.owner, job_id, after=None,
                                                 limit=1000))["data"]
                if len(ckpts) != n_ckpts:
                    n_ckpts = len(ckpts)
                    yield _sse("checkpoints", ckpts)
            if job["status"] in TERMINAL and not new:
                yield _sse("end", {"status": job["status"]})
                return
            if await request.is_disconnected():
                return
            await asyncio.sleep(STREAM_POLL_S)
            job = await run_in_threadpool(svc.get_job, who.owner, job_id)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


@router.get("/api/jobs-stream")
async def jobs_stream(request: Request, who: Principal = Who) -> StreamingResponse:
    """Server-sent events for the Jobs list: the owner's newest 100 jobs (id, status, step, fine-tuned model)
    whenever one of them changes, so the list stays live without the page polling."""
    svc = service(request)

    async def stream() -> AsyncIterator[str]:
        shown: list[dict[str, Any]] | None = None
        started = time.monotonic()
        yield "retry: 2000\n\n"
        while time.monotonic() - started < STREAM_MAX_S:
            listed = (await run_in_threadpool(svc.list_jobs, who.owner, after=None, limit=100))["data"]
            brief = [{"id": j["id"], "status": j["status"], "fine_tuned_model": j["fine_tuned_model"],
                      "step": j["tunelab"]["step"], "total_steps": j["tunelab"]["total_steps"]} for j in listed]
            if brief != shown:
                shown = brief
                yield _sse("jobs", brief)
            if await request.is_disconnected():
                return
            await asyncio.sleep(2 * STREAM_POLL_S)

    return StreamingResponse(stream(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"})


# Last: its `{action}` would otherwise take the paths above (register, stream).
@router.post("/api/jobs/{job_id}/{action}")
def job_action(job_id: str, action: str, request: Request, who: Principal = Who) -> dict[str, Any]:
    svc = service(request)
    if action == "cancel":
        return svc.cancel(who.owner, job_id)
    if action == "pause":
        return svc.pause(who.owner, job_id)
    if action == "resume":
        return svc.resume(who.owner, job_id)
    raise APIError(404, f"no job action {action!r} (cancel, pause or resume)", code="not_found")
