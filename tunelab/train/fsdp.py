"""Sharded full fine-tuning across processes with PyTorch FSDP2 (`torch.distributed.fsdp.fully_shard`).

`train.fsdp: true` under `torchrun`/`accelerate launch` with several processes: each decoder layer and then the
whole model are sharded, so every process holds 1/N of the weights, gradients and optimizer state and gathers a
layer's weights only while that layer runs. tunelab shards with PyTorch directly rather than through
accelerate's FSDP plugin because accelerate turns its plugin on only for accelerator devices (CUDA, XPU, ...):
under plain CPU processes it silently falls back to DDP, and these same calls run on gloo (CPU) and NCCL (GPU).

What changes for the loop, all here:
  - every process must run the same number of forward passes (each one all-gathers weights), so evaluation
    pads the shorter shards with throw-away batches (`extra_eval_batches`);
  - checkpoints hold full (unsharded) weights and optimizer state gathered collectively, so a run resumes on
    any number of processes, sharded or not, and the saved model is an ordinary Hugging Face folder.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from tunelab.errors import ConfigError


def check_supported(accelerator: Any) -> None:
    """Refuse launch setups the loop does not cover, with the reason, before any work. (Which configs may use
    `train.fsdp` is checked with the rest of the config, in RunConfig.)"""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        raise ConfigError("accelerate's FSDP plugin is configured: tunelab shards with PyTorch FSDP2 itself; "
                          "launch without the FSDP plugin and set train.fsdp: true")
    if kind == DistributedType.DEEPSPEED:
        raise ConfigError("DeepSpeed is not supported by tunelab's training loop (its checkpoints would not be "
                          "resumable); for sharded full fine-tuning set train.fsdp: true")


def active(cfg: Any, accelerator: Any) -> bool:
    return bool(cfg.train.fsdp) and accelerator.num_processes > 1


def shard(model: Any) -> Any:
    """Shard each decoder layer, then the rest (embeddings, final norm, LM head -- tied weights stay together)."""
    from torch.distributed.fsdp import fully_shard

    layers = _decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def _decoder_layers(model: Any) -> list[Any]:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if layers is None:
        raise ConfigError(f"train.fsdp: cannot find the decoder layers of {type(model).__name__} (expected "
                          "model.model.layers, as in Llama, Mistral, Qwen, Gemma and SmolLM)")
    return list(layers)


def _options(cpu_offload: bool = True) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=cpu_offload)


def full_model_state(model: Any) -> dict[str, torch.Tensor]:
    """The whole model's weights on rank 0 (an empty dict elsewhere). Collective: every process must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    sd: dict[str, Any] = get_model_state_dict(model, options=_options())
    # Gathering copies each name on its own, so tied weights (embeddings = LM head) come back twice; keep the
    # first name only, as save_pretrained does for an unsharded model.
    seen: set[int] = set()
    for name, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            sd.pop(name, None)
        seen.add(id(p))
    return sd


def full_optimizer_state(model: Any, optimizer: Any) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, unsharded, on rank 0. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, _raw(optimizer), options=_options())


def load_full_state(model: Any, optimizer: Any, weights: dict[str, torch.Tensor], optim: dict[str, Any]) -> None:
    """Put full weights and optimizer state (as saved above, read by every process) back into the shards."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, dict(weights), options=_options(cpu_offload=False))
    set_optimizer_state_dict(model, _raw(optimizer), optim, options=_options(cpu_offload=False))


def saved_by_name(optimizer_state: dict[str, Any]) -> bool:
    """Whether a checkpoint's optimizer state is the gathered kind (keyed by parameter name, not position)."""
    return any(isinstance(k, str) for k in optimizer_state.get("state", {}))


def _raw(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate wraps it


def extra_eval_batches(n_items: int, world: int, batch_size: int, mine: int) -> int:
    """How many throw-away forward passes this process adds so that all run max-shard-size batches."""
    most = math.ceil(math.ceil(n_items / world) / batch_size)
    return most - math.ceil(mine / batch_size)
