"""The memory model of `tunelab plan memory`: peak training memory from an architecture and a training shape.

Weights, gradients and optimizer state follow from parameter counts and dtypes. Activations follow the
per-layer accounting of Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer
Models", sec. 4.1): count every tensor autograd keeps for the backward pass, per token and layer. That paper's
34*s*b*h assumes GPT's MLP and fp16 everywhere; here the inventory is taken tensor by tensor for a Llama-style
layer (RMSNorm, q/k/v/o, SwiGLU MLP) as PyTorch and transformers run it in tunelab's loop:

- RMSNorm upcasts its input to fp32 and keeps it (4h bytes); it also keeps the normalized tensor when its
  weight is trained.
- Attention runs through SDPA (a flash kernel: no s*s scores are kept; q, k, v, the output and the fp32
  log-sum-exp are). Eager attention adds the s*s probabilities. Under padding (no packing) grouped k/v heads
  are repeated to the query heads first.
- The SwiGLU MLP keeps gate, silu(gate) and up; the product only when down_proj's weight is trained.
- A frozen base linear keeps nothing of its input (its weight needs no gradient). An adapted linear still
  does: LoRA's branch keeps the dropout mask (a float tensor on CPU, a byte on CUDA), lora_A's input (cast to
  the compute dtype under autocast) and lora_A's r outputs; DoRA also keeps the base output it rescales.
- Under bf16 autocast with fp32 weights (full fine-tuning keeps fp32 masters) each linear casts its own copy
  of an fp32 input, and the bf16 copies of the weights are kept for the backward pass.
- QLoRA's prepare_model_for_kbit_training casts every non-quantized parameter to fp32, so the residual stream
  (and the MLP's elementwise tensors, which bitsandbytes returns in the input's dtype) is fp32, and the fp32
  LM head is cast to bf16 once per step under autocast.
- The LM head runs only on trained positions (`logits_to_keep`); the loss upcasts logits to fp32 and keeps
  log-softmax; the backward pass holds the fp32 gradient of both.

The peak is the larger of two moments: the start of the backward pass (all activations and the logits alive,
optimizer state from earlier steps, the LM head's gradient) and the optimizer step (weights, gradients,
state and the optimizer's temporaries). Gradient checkpointing keeps one hidden state per layer and
recomputes one layer at a time.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from tunelab.errors import TunelabError
from tunelab.plan.arch import Arch

Method = Literal["full", "lora", "qlora", "dora"]
Optim = Literal["adamw", "adamw8bit", "paged_adamw"]
GB = 10**9
GiB = 2**30
CUDA_CONTEXT = 512 * 2**20
"""CUDA context and cuBLAS workspaces: resident on the card, never in max_memory_allocated."""


@dataclass(frozen=True)
class Shape:
    """How the model is trained: what `tunelab plan memory` takes as flags."""

    method: Method = "lora"
    seq_len: int = 1024
    batch: int = 1
    grad_ckpt: bool = False
    optimizer: Optim = "adamw"
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    packing: bool = True
    processes: int = 1
    fsdp: bool = False
    grad_accum: int = 1
    lora_r: int = 16
    lora_targets: tuple[str, ...] | None = None
    """None = all linear layers of a decoder layer (PEFT's "all-linear")."""
    lora_dropout: float = 0.05
    loss_chunk: int = 256
    """`train.loss_chunk`: LM head + loss computed this many positions at a time (0: the whole logits at once)."""
    double_quant: bool = True
    attention: Literal["sdpa", "eager"] = "sdpa"
    trained_fraction: float = 1.0
    """Fraction of tokens that carry a loss (the LM head runs only there); 1.0 is the worst case."""
    device: Literal["cpu", "cuda"] = "cuda"
    bf16_ok: bool = True
    """Whether the device computes in bf16 (autocast): every CUDA card since Ampere; CPUs with AVX512-BF16/AMX."""

    def check(self) -> None:
        if self.seq_len < 1 or self.batch < 1 or self.processes < 1 or self.grad_accum < 1 or self.lora_r < 1:
            raise TunelabError("--seq-len, --batch, --processes, --grad-accum and --lora-r must be >= 1", 2)
        if self.fsdp and self.method != "full":
            raise TunelabError("--fsdp shards full fine-tuning (as train.fsdp does); use --method full", 2)
        if not 0 < self.trained_fraction <= 1:
            raise TunelabError("--trained-fraction must be in (0, 1]", 2)


@dataclass
class Estimate:
    """A breakdown in bytes; `total_bytes` is the peak on one process."""

    model: str
    shape: Shape
    weights_bytes: int
    gradients_bytes: int
    optimizer_bytes: int
    activations_bytes: int
    logits_bytes: int
    adapters_bytes: int
    overhead_bytes: int
    total_bytes: int
    params: int
    trainable_params: int
    peak_at: str
    notes: list[str]

    def parts(self) -> dict[str, int]:
        return {"weights": self.weights_bytes, "gradients": self.gradients_bytes, "optimizer": self.optimizer_bytes,
                "activations": self.activations_bytes, "logits and loss": self.logits_bytes,
                "adapters": self.adapters_bytes, "framework overhead": self.overhead_bytes}

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = asdict(self.shape)
        d["allocated_bytes"] = self.total_bytes - self.overhead_bytes
        return d


def _dtypes(s: Shape) -> tuple[int, int, int, bool]:
    """(base weight bytes, compute bytes, residual-stream bytes, autocast) as `tunelab train` sets them up."""
    autocast = s.dtype in ("auto", "bf16") and s.bf16_ok
    if s.dtype == "fp32" or (s.dtype == "auto" and (s.method == "full" or not s.bf16_ok)):
        w = 4  # full fine-tuning keeps fp32 masters; without bf16 everything is fp32
    else:
        w = 2
    c = 2 if autocast else w
    stream = 4 if s.method == "qlora" else w
    return w, c, stream, autocast


def adapter_params(arch: Arch, s: Shape) -> int:
    if s.method == "full":
        return 0
    n = 0
    for lin in _targets(arch, s):
        n += s.lora_r * (lin.in_features + lin.out_features)
        if s.method == "dora":
            n += lin.out_features  # the magnitude vector
    return n * arch.layers


def _targets(arch: Arch, s: Shape) -> list[Any]:
    if s.lora_targets is None:
        return list(arch.layer_linears)
    picked = [lin for lin in arch.layer_linears if lin.name in s.lora_targets]
    if not picked:
        names = ", ".join(sorted({lin.name for lin in arch.layer_linears}))
        raise TunelabError(f"--lora-targets {','.join(s.lora_targets)}: no such linear layer (this model has {names})", 2)
    return picked


def layer_activation_bytes(arch: Arch, s: Shape) -> float:
    """Bytes autograd keeps per token for one decoder layer (see the module docstring)."""
    w, c, stream, autocast = _dtypes(s)
    h, i, q, kv, a = arch.hidden, arch.intermediate, arch.q_dim, arch.kv_dim, arch.heads
    full = s.method == "full"
    out_dtype = stream if s.method == "qlora" else c  # what the MLP's linears hand back
    norms = 2 * (4 * h + (stream * h if full else 0))
    if not s.packing and arch.kv_heads < arch.heads:
        kv = q  # repeat_kv before SDPA when an attention mask is present
    attn = c * (2 * q + 2 * kv) + 4 * a
    if s.attention == "eager":
        attn += a * s.seq_len * (4 + c)  # softmax in fp32, probabilities cast back
    mlp = 3 * i * out_dtype
    base_inputs = 0.0
    if full:
        copies = stream != c  # autocast casts an fp32 input once per consuming linear
        base_inputs = (3 if copies else 1) * h * c + (2 if copies else 1) * h * c + i * c
    adapters = 0.0
    if s.method != "full":
        mask = 4 if s.device == "cpu" else 1
        for lin in _targets(arch, s):
            n = lin.in_features
            adapters += (n * mask if s.lora_dropout > 0 else 0) + n * (c if autocast else 4) + s.lora_r * c
            if s.method == "dora":
                adapters += lin.out_features * c
    return norms + attn + mlp + base_inputs + adapters


def estimate(arch: Arch, s: Shape) -> Estimate:
    s.check()
    w, c, stream, autocast = _dtypes(s)
    notes: list[str] = []
    tokens = s.seq_len * s.batch
    kept = max(1, round(tokens * s.trained_fraction))
    shards = s.processes if s.fsdp else 1

    if s.method == "qlora":
        # NF4: half a byte per weight plus one absmax per 64 (fp32, or 8-bit with an fp32 per 256 blocks).
        per = 0.5 + (1 / 64 + 4 / (64 * 256) if s.double_quant else 4 / 64)
        weights = arch.linear_params * per + (arch.params - arch.linear_params) * 4
    else:
        weights = arch.params * w
    weights /= shards
    n_adapt = adapter_params(arch, s)
    trainable = arch.params if s.method == "full" else n_adapt
    state_bytes = w if s.method == "full" else 4
    grads = arch.params * w / shards if s.method == "full" else 0.0
    adapters = n_adapt * 4 * 2  # fp32 adapter weights and their gradients
    opt_per_param = {"adamw": 2 * state_bytes, "paged_adamw": 2 * state_bytes, "adamw8bit": 2}[s.optimizer]
    optimizer = trainable * opt_per_param / (shards if s.method == "full" else 1)
    if s.optimizer == "paged_adamw":
        notes.append("paged AdamW keeps its state in CUDA unified memory: under pressure it pages to CPU RAM, "
                     "so the card can hold less than counted here")
    if s.processes > 1 and not s.fsdp:
        notes.append(f"{s.processes} data-parallel processes: each holds the full model; DDP adds gradient buckets")
        grads_ddp = (grads if s.method == "full" else n_adapt * 4)
    else:
        grads_ddp = 0.0

    per_layer = layer_activation_bytes(arch, s)
    rope = 2 * arch.head_dim * stream  # cos/sin, shared by all layers
    if s.grad_ckpt:
        acts = tokens * (arch.layers * arch.hidden * stream + per_layer + rope)
    else:
        acts = tokens * (arch.layers * per_layer + rope)
    if autocast and s.method == "full" and w != c:
        acts += (arch.linear_params + arch.vocab * arch.hidden) * c / shards  # bf16 weight copies kept
    if autocast and s.method != "full":
        acts += n_adapt * c  # bf16 copies of the adapters
    if autocast and s.method == "qlora":
        acts += arch.vocab * arch.hidden * c  # the LM head, fp32 after prepare_model_for_kbit_training, cast once
    if s.method == "full":
        acts += tokens * arch.hidden * c  # the LM head's input
    if s.loss_chunk > 0:
        # Chunked LM head + loss (tunelab.losses.linear_cross_entropy): one chunk's logits at a time (fp32, and
        # their compute-dtype gradient), and the gradient of the head's input for all kept positions.
        logits = min(s.loss_chunk, kept) * arch.vocab * (4 + c) + kept * arch.hidden * c
    else:
        # LM head on kept positions: logits in compute dtype, the fp32 copy, log-softmax, and in the backward pass
        # the fp32 gradient of log-softmax and of the upcast.
        logits = kept * arch.vocab * (c + 4 + 4 + 4)
    if s.processes > 1 and s.fsdp:
        acts += 2 * arch.linear_params / arch.layers * w  # one layer gathered, the next prefetched

    # Full fine-tuning: the LM head's weight gradient in the compute dtype, its cast, and the (embedding) grad.
    head_grad = arch.vocab * arch.hidden * (c + 2 * w) if s.method == "full" else 0
    held_grads = grads if s.grad_accum > 1 else head_grad / shards
    at_backward = weights + adapters + optimizer + acts + logits + held_grads + grads_ddp
    if s.device == "cuda":  # foreach AdamW: temporaries the size of the trainable state
        opt_tmp = trainable * state_bytes / (shards if s.method == "full" else 1)
    else:  # per-tensor AdamW: two temporaries the size of the largest trainable tensor
        biggest = max(arch.vocab * arch.hidden, arch.hidden * arch.intermediate) if s.method == "full" else \
            max((s.lora_r * lin.in_features for lin in _targets(arch, s)), default=0)
        opt_tmp = 2 * biggest * state_bytes
    if s.optimizer == "adamw8bit":
        opt_tmp = 0.0
    at_step = weights + adapters + optimizer + grads + grads_ddp + opt_tmp
    peak_at = "backward start" if at_backward >= at_step else "optimizer step"
    overhead = CUDA_CONTEXT if s.device == "cuda" else 0
    if s.device == "cuda":
        notes.append("framework overhead: the CUDA context (not in torch.cuda.max_memory_allocated)")
    # The breakdown shows each part at its own size; what is not alive at the peak moment is subtracted in
    # the total, so the parts add up to more than the total only by what the peak moment does not hold.
    total = max(at_backward, at_step) + overhead
    return Estimate(
        model=arch.name, shape=s, weights_bytes=int(weights), gradients_bytes=int(grads + grads_ddp),
        optimizer_bytes=int(optimizer + opt_tmp), activations_bytes=int(acts), logits_bytes=int(logits),
        adapters_bytes=int(adapters), overhead_bytes=int(overhead), total_bytes=int(total), params=arch.params,
        trainable_params=int(trainable), peak_at=peak_at, notes=notes,
    )


def fits(arch: Arch, s: Shape, budget: int) -> bool:
    return estimate(arch, s).total_bytes <= budget


def largest_batch(arch: Arch, s: Shape, budget: int, cap: int = 4096) -> int:
    """The largest micro-batch at s.seq_len that fits (0 if none)."""
    if not fits(arch, replace(s, batch=1), budget):
        return 0
    lo, hi = 1, 2
    while hi <= cap and fits(arch, replace(s, batch=hi), budget):
        lo, hi = hi, hi * 2
    hi = min(hi, cap + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(arch, replace(s, batch=mid), budget) else (lo, mid)
    return lo


def largest_seq_len(arch: Arch, s: Shape, budget: int, cap: int = 1 << 20) -> int:
    """The largest sequence length (a multiple of 128) at s.batch that fits (0 if none)."""
    step = 128
    if not fits(arch, replace(s, seq_len=step), budget):
        return 0
    lo, hi = 1, 2
    while hi * step <= cap and fits(arch, replace(s, seq_len=hi * step), budget):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(arch, replace(s, seq_len=mid * step), budget) else (lo, mid)
    return lo * step


def parse_bytes(text: str) -> int:
    """'24GB' -> 24e9, '24GiB' -> 24*2**30, '500MB', or a plain number of bytes."""
    t = text.strip().upper().replace(" ", "")
    units = {"TIB": 2**40, "GIB": GiB, "MIB": 2**20, "KIB": 2**10, "TB": 10**12, "GB": GB, "MB": 10**6,
             "KB": 10**3, "T": 10**12, "G": GB, "M": 10**6, "K": 10**3, "B": 1}
    num, mult = t, 1
    for u, m in units.items():
        if t.endswith(u):
            num, mult = t[: -len(u)], m
            break
    try:
        val = float(num)
    except ValueError:
        raise TunelabError(f"--budget {text!r}: expected a size such as 24GB, 24GiB or 500MB", 2) from None
    if val <= 0:
        raise TunelabError(f"--budget {text!r}: must be positive", 2)
    return int(val * mult)
