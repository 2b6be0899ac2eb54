"""Thin FastAPI routers for `/v1/files`, `/v1/fine_tuning/jobs` and `/v1/fine_tuning/alpha/graders`: parse,
call `JobsService` (or tunelab.graders.api), return.

Every route takes the caller's `Principal` (the server's app-wide API-key dependency) and passes its owner
on, so each key sees only its own files, jobs and events. Blocking database work runs in the thread pool.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from starlette.datastructures import UploadFile

from tunelab.jobs.hyper import JobCreate
from tunelab.jobs.service import JobsService
from tunelab.server.auth import Principal, authenticate
from tunelab.server.errors import APIError

router = APIRouter()


def get_service(request: Request) -> JobsService:
    service: JobsService = request.app.state.jobs
    return service


Svc = Depends(get_service)
Who = Depends(authenticate)


# ---------------------------------------------------------------------------------------------- files
@router.post("/v1/files")
async def upload_file(request: Request, service: JobsService = Svc, who: Principal = Who) -> dict[str, Any]:
    try:
        # Starlette spools each file part to a temporary file past 1 MiB: large uploads never sit in memory
        # here; the service then copies it to its generated name, enforcing the upload size limit.
        form = await request.form(max_files=1, max_fields=8)
    except Exception as e:  # malformed multipart (an upload cut off past the size limit is answered 413 upstream)
        why = str(e) or type(e).__name__
        raise APIError(400, f"expected a multipart/form-data body with 'file' and 'purpose': {why}",
                       code="invalid_request") from None
    try:
        upload = form.get("file")
        purpose = form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise APIError(400, "missing 'file' (a multipart file field)", param="file", code="missing_required_parameter")
        if not isinstance(purpose, str) or not purpose:
            raise APIError(400, "missing 'purpose'", param="purpose", code="missing_required_parameter")
        return await run_in_threadpool(service.upload, who.owner, upload.filename, purpose, upload.file)
    finally:
        await form.close()


@router.get("/v1/files")
def list_files(
    purpose: str | None = None, limit: int = Query(10_000), after: str | None = None,
    order: str = Query("desc", pattern="^(asc|desc)$"), service: JobsService = Svc, who: Principal = Who,
) -> dict[str, Any]:
    return service.list_files(who.owner, purpose=purpose, after=after, limit=limit, order=order)


@router.get("/v1/files/{file_id}")
def get_file(file_id: str, service: JobsService = Svc, who: Principal = Who) -> dict[str, Any]:
    return service.get_file(who.owner, file_id)


@router.get("/v1/files/{file_id}/content")
def file_content(file_id: str, service: JobsService = Svc, who: Principal = Who) -> FileResponse:
    path, filename = service.file_content_path(who.owner, file_id)
    return FileResponse(path, media_type="application/octet-stream", filename=filename)


@router.delete("/v1/files/{file_id}")
def delete_file(file_id: str, service: JobsService = Svc, who: Principal = Who) -> dict[str, Any]:
    return service.delete_file(who.owner, file_id)


# ---------------------------------------------------------------------------------------------- jobs
@router.post("/v1/fine_tuning/jobs")
def create_job(body: JobCreate, service: JobsService = Svc, who: Principal = Who) -> dict[str, Any]:
    return service.create_job(who.owner, body)


@router.get("/v1/fine_tuning/jobs")
def list_jobs(request: Request, after: str | None = None, limit: int = Query(20), service: JobsService = Svc,
              who: Principal = Who) -> dict[str, Any]:
    # metadata[k]=v filters, as OpenAI's deep-object query parameter.
    meta = {k[len("metadata["):-1]: v for k, v in request.query_params.items()
            if k.startswith("metadata[") and k.endswith("]")}
    return service.list_jobs(who.owner, after=after, limit=limit, metadata=meta or None)


@router.get("/v1/fine_tuning/jobs/{job_id}")
def get_job(job_id: str, service: JobsService = Svc, who: Principal = Who) -> dict[str, Any]:
    return service.get_job(who.owner, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
def cancel_job(job_id: str, service: JobsService = Svc, who: Principal = Who) -> dict[str, Any]:
    return service.cancel(who.owner, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/pause")
def pause_job(job_id: str, service: JobsService = Svc, who: Principal = Who) -> dict[str, Any]:
    return service.pause(who.owner, job_id)


@router.post("/v1/fine_tuning/jobs/{job_id}/resume")
def resume_job(job_id: str, service: JobsService = Svc, who: Principal = Who) -> dict[str, Any]:
    return service.resume(who.owner, job_id)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
def list_events(job_id: str, after: str | None = None, limit: int = Query(20), service: JobsService = Svc,
                who: Principal = Who) -> dict[str, Any]:
    return service.list_events(who.owner, job_id, after=after, limit=limit)


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
def list_checkpoints(job_id: str, after: str | None = None, limit: int = Query(10), service: JobsService = Svc,
                     who: Principal = Who) -> dict[str, Any]:
    return service.list_checkpoints(who.owner, job_id, after=after, limit=limit)


# ---------------------------------------------------------------------------------------------- graders
async def _grader_call(request: Request, fn: Any) -> dict[str, Any]:
    from tunelab.graders import GraderError

    try:
        body = await request.json()
    except ValueError:
        raise APIError(400, "the request body is not valid JSON", code="invalid_request") from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_request")
    try:
        result: dict[str, Any] = await run_in_threadpool(fn, body)  # a python grader blocks on its subprocess
    except GraderError as e:
        raise APIError(400, e.message, param=e.param, code="invalid_grader") from None
    return result


@router.post("/v1/fine_tuning/alpha/graders/validate")
async def validate_grader(request: Request, who: Principal = Who) -> dict[str, Any]:
    from tunelab.graders import api

    return await _grader_call(request, api.validate)


@router.post("/v1/fine_tuning/alpha/graders/run")
async def run_grader(request: Request, who: Principal = Who) -> dict[str, Any]:
    from tunelab.graders import api

    return await _grader_call(request, api.run)
