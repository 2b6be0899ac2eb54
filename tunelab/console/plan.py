"""Plan page: `tunelab plan memory` and `tunelab plan cost` as two forms (GET: they change nothing), computed by
the same functions (`tunelab.plan.memory.estimate` on `load_arch`, `tunelab.plan.cost.compute`)."""

from __future__ import annotations

from dataclasses import fields
from typing import Any, Literal

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, Response
from pydantic import BaseModel, Field, ValidationError

from tunelab.console.app import page
from tunelab.console.session import current
from tunelab.errors import TunelabError

router = APIRouter()


class MemoryForm(BaseModel):
    model: str = Field("", max_length=1000)
    method: Literal["full", "lora", "qlora", "dora"] = "lora"
    seq_len: int = Field(1024, ge=1, le=1 << 20)
    batch: int = Field(1, ge=1, le=4096)
    grad_ckpt: bool = False
    optimizer: Literal["adamw", "adamw8bit", "paged_adamw"] = "adamw"
    lora_r: int = Field(16, ge=1, le=4096)
    device: Literal["cuda", "cpu"] = "cuda"
    budget: str = Field("", max_length=32)


class CostForm(BaseModel):
    calls_per_month: float = Field(100_000, ge=0)
    prompt_tokens_removed: float = Field(0, ge=0)
    prompt_tokens: float = Field(0, ge=0)
    output_tokens: float = Field(0, ge=0)
    input_price: float = Field(0, ge=0)
    output_price: float = Field(0, ge=0)
    hosting_per_month: float = Field(0, ge=0)
    train_tokens: float = Field(0, ge=0)
    epochs: float = Field(1, ge=0)
    tokens_per_s: float | None = Field(None, ge=0)
    gpu_hour_price: float = Field(0, ge=0)
    train_price: float | None = Field(None, ge=0)


def _memory(f: MemoryForm) -> dict[str, Any]:
    import torch

    from tunelab.model.loading import bf16_supported
    from tunelab.plan.arch import load_arch
    from tunelab.plan.memory import Shape, estimate, largest_batch, parse_bytes

    bf16 = True if f.device == "cuda" else bf16_supported(torch.device("cpu"))
    shape = Shape(method=f.method, seq_len=f.seq_len, batch=f.batch, grad_ckpt=f.grad_ckpt, optimizer=f.optimizer,
                  lora_r=f.lora_r, device=f.device, bf16_ok=bf16)
    shape.check()
    arch = load_arch(f.model)
    est = estimate(arch, shape)
    out: dict[str, Any] = {"est": est, "parts": est.parts()}
    if f.budget.strip():
        b = parse_bytes(f.budget.strip())
        out["budget"] = {"bytes": b, "fits": est.total_bytes <= b, "largest_batch": largest_batch(arch, shape, b)}
    return out


def _form(model: type[BaseModel], params: dict[str, str], defaults: dict[str, Any]) -> tuple[Any, str | None]:
    given: dict[str, Any] = {k: v for k, v in params.items() if k in model.model_fields and v != ""}
    if model is MemoryForm:  # an unchecked checkbox sends nothing
        given["grad_ckpt"] = params.get("grad_ckpt") == "on"
    try:
        return model.model_validate({**defaults, **given}), None
    except ValidationError as e:
        err = e.errors()[0]
        return model.model_validate(defaults), f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}"


@router.get("/plan", response_class=HTMLResponse)
async def plan_page(request: Request, go: str | None = None) -> Response:
    """One form for both calculators (so both results stay on the page); `go` set: it was submitted."""
    if current(request).principal is None:
        return page(request, "plan.html", "Plan")  # the sign-in form first
    jobs = getattr(request.app.state, "jobs", None)
    base = jobs.settings.base_model if jobs is not None else request.app.state.engine.base_model_name
    params = dict(request.query_params) if go else {}
    mem_form, mem_error = _form(MemoryForm, params, {"model": base})
    cost_form, cost_error = _form(CostForm, params, {})
    memory = cost = None
    if go and mem_error is None:
        try:
            memory = await run_in_threadpool(_memory, mem_form)
        except TunelabError as e:
            mem_error = e.message
        except (OSError, ValueError) as e:  # a model name that is neither a preset, a folder nor a config
            mem_error = f"cannot read the architecture of {mem_form.model!r}: {e}"
    if go and cost_error is None:
        from tunelab.plan.cost import CostInputs, compute

        names = {f.name for f in fields(CostInputs)}
        try:
            cost = compute(CostInputs(**{k: v for k, v in cost_form.model_dump().items() if k in names}))
        except TunelabError as e:
            cost_error = e.message
    return page(request, "plan.html", "Plan", mem=mem_form, mem_error=mem_error, memory=memory, cost_form=cost_form,
                cost_error=cost_error, cost=cost)
