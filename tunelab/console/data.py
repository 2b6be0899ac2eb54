"""Data page: upload a JSONL training file (the Files API's `JobsService.upload`, purpose fine-tune), then its
validation exactly as `tunelab data validate` reports it (`tunelab.data.validate.validate_file`, each problem with
its line and field), stats (examples, roles, tokens per example with the served model's tokenizer and chat
template, trained tokens, duplicates) and one example rendered token by token with its label mask
(`tunelab.data.templates.encode`: trained tokens highlighted).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from starlette.datastructures import UploadFile

from tunelab.console.app import not_found, page
from tunelab.console.jobs import _owner, service
from tunelab.console.session import signed_in
from tunelab.data.records import Conversation, Preference, Record
from tunelab.server.auth import Principal
from tunelab.server.errors import APIError

router = APIRouter()
MAX_SHOWN_TOKENS = 2000  # the label-mask view of one example


def tokenizer_of(request: Request) -> Any | None:
    engine = request.app.state.engine
    # The real Engine keeps its tokenizer as `_tok`; a fake engine (tests) has none, and then no token stats.
    return getattr(engine, "tokenizer", None) or getattr(engine, "_tok", None)


@router.get("/data", response_class=HTMLResponse)
def data_page(request: Request) -> Response:
    owner = _owner(request)
    svc = getattr(request.app.state, "jobs", None)
    files = [] if owner is None or svc is None else svc.list_files(
        owner, purpose="fine-tune", after=None, limit=1000, order="desc")["data"]
    return page(request, "data.html", "Data", files=files)


@router.post("/api/files")
async def upload(request: Request, who: Principal = Depends(signed_in)) -> dict[str, Any]:
    svc = service(request)
    try:
        form = await request.form(max_files=1, max_fields=4)
    except Exception as e:  # malformed multipart
        raise APIError(400, f"expected a multipart form with a 'file': {e or type(e).__name__}",
                       code="invalid_request") from None
    try:
        file = form.get("file")
        if not isinstance(file, UploadFile):
            raise APIError(400, "choose a file to upload", param="file", code="missing_required_parameter")
        return await run_in_threadpool(svc.upload, who.owner, file.filename, "fine-tune", file.file)
    finally:
        await form.close()


def _conversations(r: Record) -> tuple[Conversation, ...]:
    return r.as_conversations() if isinstance(r, Preference) else (r,) if isinstance(r, Conversation) else ()


def _mask(tok: Any, conv: Conversation) -> tuple[list[tuple[str, bool]], int, int]:
    from tunelab.data.templates import IGNORE_INDEX, encode

    enc = encode(tok, conv)
    shown = [(tok.decode([t]), lab != IGNORE_INDEX)
             for t, lab in zip(enc.input_ids[:MAX_SHOWN_TOKENS], enc.labels[:MAX_SHOWN_TOKENS], strict=True)]
    return shown, len(enc.input_ids), enc.num_trained


@router.get("/data/{file_id}", response_class=HTMLResponse)
def file_page(file_id: str, request: Request, example: int = 1) -> Response:
    """`example` is 1-based, as the page shows it."""
    from tunelab.data.validate import validate_file

    owner = _owner(request)
    if owner is None:
        return page(request, "file.html", "Data")
    svc = service(request)
    try:
        meta = svc.get_file(owner, file_id)
        path, filename = svc.file_content_path(owner, file_id)
    except APIError as e:
        return not_found(request, e.message)
    tok = tokenizer_of(request)
    rep = validate_file(path, tokenizer=tok, max_seq_len=svc.settings.context_length)
    roles: Counter[str] = Counter()
    for r in rep.records:
        for c in _conversations(r)[:1]:
            roles.update(m.role for m in c.messages)
    example = max(0, min(example - 1, len(rep.records) - 1)) if rep.records else 0
    mask: list[tuple[str, bool]] = []
    tokens = trained = 0
    line = None
    if rep.records and tok is not None:
        rec = rep.records[example]
        line = rec.source.line if rec.source else None
        convs = _conversations(rec)
        if convs:
            mask, tokens, trained = _mask(tok, convs[0])
    return page(request, "file.html", f"Data: {filename}", file=meta, report=rep, roles=dict(roles),
                example=example, example_line=line, mask=mask, mask_tokens=tokens, mask_trained=trained,
                has_tokenizer=tok is not None, truncated_view=tokens > MAX_SHOWN_TOKENS)
