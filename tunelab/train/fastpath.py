"""Speed options of the training forward pass that change no result, applied by `prepare_for_speed` to the
adapted model before the optimizer is built. Measured in docs/benchmarks.md ("SFT-LoRA throughput").

- Packed attention (on by default for SDPA models): a packed row holds several examples back to back, and
  transformers gives SDPA a block-diagonal causal mask over the whole row. With a mask, CPU flash attention
  computes every block of the row (masked or not) and GQA models first copy keys and values to every head;
  one causal call per example (`is_causal`, no mask, `enable_gqa`) computes only each example's own
  triangle. `packed_attention` does that when the forward is told the rows' segment lengths
  (`SEQ_LENS_KWARG`, set by the training methods for packed batches); any other call (generation, padded
  batches, a KV cache) is plain SDPA, mask and all.
- Lean activations (on by default, Llama-style RMSNorm and SiLU-gated MLP): the same math as transformers'
  modules through autograd Functions that keep less for backward. RMSNorm keeps its input in the model's
  dtype and one fp32 scale per row, not the fp32 copy of the input that eager autograd saves; the gated MLP
  keeps the gate and up projections and recomputes SiLU in backward, rather than also keeping SiLU's output.
  About a quarter of the activation memory of a LoRA step on SmolLM2 (docs/benchmarks.md).
- `train.compile` compiles each decoder layer with torch.compile (inductor; on CPU it needs a C++ compiler).
"""

from __future__ import annotations

import inspect
import logging
import textwrap
import types
from functools import cache
from typing import Any

import torch
import torch.nn.functional as F

from tunelab.config import RunConfig
from tunelab.model.parts import base_model

log = logging.getLogger(__name__)

PACKED = "tunelab_packed_sdpa"
"""The attention implementation name registered with transformers for `packed_attention`."""
SEQ_LENS_KWARG = "tunelab_seq_lens"
"""Forward keyword: per row, the lengths of the segments (examples, then the unused tail) it packs."""
MASKED_ABOVE = 16
"""A row packing more segments than this keeps the masked whole-row call: many tiny causal calls cost more
in per-call overhead than the masked blocks they skip."""


def segment_lengths(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row of a packed batch, the lengths of its segments: positions restart at 0 where a segment starts."""
    out = []
    for row in position_ids.tolist():
        starts = [i for i, p in enumerate(row) if p == 0] + [len(row)]
        out.append([b - a for a, b in zip(starts, starts[1:], strict=False) if b > a])
    return out


def packed_attention(
    module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
    attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None, **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers attention function (its `sdpa_attention_forward` signature and output layout,
    (B, L, H, D)): one causal SDPA call per packed segment when `SEQ_LENS_KWARG` is given, else plain SDPA."""
    from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward

    lens = kwargs.pop(SEQ_LENS_KWARG, None)
    if lens is None or query.shape[2] != key.shape[2] or len(lens) != query.shape[0] or kwargs.get("softcap") is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    rows = []
    for b, row_lens in enumerate(lens):
        q, k, v = query[b : b + 1], key[b : b + 1], value[b : b + 1]
        if len(row_lens) > MASKED_ABOVE and attention_mask is not None:
            groups = query.shape[1] // key.shape[1]
            rows.append(F.scaled_dot_product_attention(q, repeat_kv(k, groups), repeat_kv(v, groups),
                                                       attn_mask=attention_mask[b : b + 1], dropout_p=dropout, scale=scaling))
            continue
        parts = [F.scaled_dot_product_attention(qs, ks, vs, dropout_p=dropout, scale=scaling, is_causal=True, enable_gqa=gqa)
                 for qs, ks, vs in zip(q.split(row_lens, 2), k.split(row_lens, 2), v.split(row_lens, 2), strict=True)]
        rows.append(parts[0] if len(parts) == 1 else torch.cat(parts, 2))
    out = rows[0] if len(rows) == 1 else torch.cat(rows, 0)
    return out.transpose(1, 2).contiguous(), None


def use_packed_attention(model: Any) -> bool:
    """Switch an SDPA model to `packed_attention` (registered once with transformers, masks as SDPA's).
    Returns whether it applies (models on another implementation, e.g. flash-attention's own varlen, keep it)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    base = base_model(model)
    config = getattr(base, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    AttentionInterface.register(PACKED, packed_attention)
    AttentionMaskInterface.register(PACKED, sdpa_mask)
    base.set_attn_implementation(PACKED)
    return True


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    """The repeated blocks of a transformers decoder (under PEFT's wrappers): what torch.compile gets."""
    for mod in base_model(model).modules():
        layers = getattr(mod, "layers", None)
        if isinstance(layers, torch.nn.ModuleList) and len(layers) > 0:
            return list(layers)
    return []


def _acc(x: torch.Tensor) -> torch.dtype:
    """The dtype statistics and recomputations run in: fp32, or fp64 for fp64 inputs (gradient checks)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


class _RMSNorm(torch.autograd.Function):
    """transformers' Llama RMSNorm, `weight * (x / rms(x)).to(x.dtype)` with the statistics in fp32, keeping
    `x` as it came (bf16 in a bf16 model) and the fp32 reciprocal rms for backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        xf = x.to(_acc(x))
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
        ctx.save_for_backward(x, weight, rstd)
        return weight * (xf * rstd).to(x.dtype)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        x, weight, rstd = ctx.saved_tensors
        acc = _acc(x)
        xhat = x.to(acc) * rstd
        gw = None
        if ctx.needs_input_grad[1]:
            gw = (grad.to(acc) * xhat.to(x.dtype).to(acc)).reshape(-1, xhat.shape[-1]).sum(0).to(weight.dtype)
        gx = None
        if ctx.needs_input_grad[0]:
            gy = (grad * weight).to(acc)
            gx = (rstd * (gy - xhat * (gy * xhat).mean(-1, keepdim=True))).to(x.dtype)
        return gx, gw, None


class _SiLUMul(torch.autograd.Function):
    """silu(gate) * up, keeping only `gate` and `up` for backward: SiLU is recomputed there (one elementwise
    pass), and the gate's gradient is aten's own fused `silu_backward`, as eager autograd computes it."""

    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        ctx.save_for_backward(gate, up)
        return F.silu(gate) * up

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        gate, up = ctx.saved_tensors
        g_gate = g_up = None
        if ctx.needs_input_grad[0]:
            g_gate = torch.ops.aten.silu_backward(grad * up, gate)
        if ctx.needs_input_grad[1]:
            g_up = grad * F.silu(gate)
        return g_gate, g_up


def _rmsnorm_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = _RMSNorm.apply(hidden_states, self.weight, float(self.variance_epsilon))
    return out


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    out: torch.Tensor = self.down_proj(_SiLUMul.apply(self.gate_proj(x), self.up_proj(x)))
    return out


@cache
def _reference_sources() -> tuple[str, str]:
    from transformers.models.llama.modeling_llama import LlamaMLP, LlamaRMSNorm

    return _source(LlamaRMSNorm.forward), _source(LlamaMLP.forward)


def _source(fn: Any) -> str:
    try:
        return textwrap.dedent(inspect.getsource(fn))
    except (OSError, TypeError):
        return ""


def use_lean_activations(model: Any) -> int:
    """Give every module whose forward is exactly transformers' Llama RMSNorm, or Llama's MLP with SiLU, the
    lean forward above (Qwen2/3, Mistral and others copy these modules verbatim; anything else, e.g. Gemma's
    1 + weight norm, differs in source and is left alone). Returns how many modules were switched."""
    norm_src, mlp_src = _reference_sources()
    n = 0
    for mod in model.modules():
        src = _source(type(mod).forward)
        if src == norm_src and hasattr(mod, "variance_epsilon"):
            mod.forward = types.MethodType(_rmsnorm_forward, mod)
            n += 1
        elif src == mlp_src and type(getattr(mod, "act_fn", None)).__name__ == "SiLUActivation":
            mod.forward = types.MethodType(_mlp_forward, mod)
            n += 1
    return n


def prepare_for_speed(model: Any, cfg: RunConfig) -> Any:
    # Compiled layers keep the masked path: a per-batch list of lengths would make dynamo recompile.
    if cfg.data.packing and not cfg.train.compile and use_packed_attention(model):
        log.info("packed attention: one causal SDPA call per packed example")
    if not cfg.train.compile:  # inductor fuses these itself, and the Functions would break its graphs
        log.info("lean activations: %d modules", use_lean_activations(model))
    if cfg.train.compile:
        layers = decoder_layers(model)
        # Shapes change with every packed batch: dynamic shapes from the start rather than a recompile per width.
        for layer in layers:
            layer.compile(dynamic=True)
        log.info("torch.compile: %d decoder layers", len(layers))
    return model
