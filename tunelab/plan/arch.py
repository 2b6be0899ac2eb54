"""What `tunelab plan memory` knows about a model: its shape, read from a config only (never weights).

A model comes from a built-in name, a local folder with config.json, a hub id (config.json only; the model is
built on the meta device, so no weights are read or allocated), or an architecture preset shipped here as
config facts. Parameters are counted on the meta model, so tied embeddings, biases and odd layers are exact.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunelab.errors import TunelabError

# Config facts of well-known architectures, as published in each model's config.json.
PRESETS: dict[str, dict[str, Any]] = {
    "llama-2-7b": dict(model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False),
    "llama-3.1-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "mistral-7b": dict(model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False),
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                       num_attention_heads=28, num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "llama-65b": dict(model_type="llama", hidden_size=8192, intermediate_size=22016, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=64, vocab_size=32000, tie_word_embeddings=False),
}


@dataclass(frozen=True)
class LinearShape:
    """One nn.Linear inside a decoder layer: its short name (q_proj...) and shape."""

    name: str
    in_features: int
    out_features: int


@dataclass(frozen=True)
class Arch:
    """The numbers the memory model needs, per decoder layer and for the whole model."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    params: int
    """All parameters (tied embeddings once)."""
    linear_params: int
    """Parameters in the decoder layers' nn.Linear weights: what 4-bit quantization compresses."""
    layer_linears: tuple[LinearShape, ...] = field(default_factory=tuple)

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim


def _config_of(source: str) -> tuple[Any, str]:
    """(transformers config, display name) for a preset, built-in name, local folder or hub id."""
    from transformers import AutoConfig

    if source in PRESETS:
        facts = dict(PRESETS[source])
        return AutoConfig.for_model(facts.pop("model_type"), **facts), source
    from tunelab.model.loading import BUILTIN_MODELS, resolve_model

    p = Path(source).expanduser()
    if source in BUILTIN_MODELS or p.exists():
        resolved = resolve_model(source)
        path = resolved.path
    else:
        path = source  # a hub id: transformers fetches config.json only
    try:
        return AutoConfig.from_pretrained(path), source
    except (OSError, ValueError) as e:
        known = ", ".join(PRESETS)
        raise TunelabError(f"cannot read a model config for {source!r}: {e}\n(architecture presets: {known})", 2) \
            from None


def load_arch(source: str) -> Arch:
    """Read the architecture of `source` and count its parameters on the meta device."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg, name = _config_of(source)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cfg)
    except (ValueError, KeyError) as e:
        raise TunelabError(f"{source}: not a causal language model transformers can build ({e})", 2) from None
    params = sum(p.numel() for p in model.parameters())
    layers_mod = _decoder_layers(model)
    linears: list[LinearShape] = []
    linear_params = 0
    for i, layer in enumerate(layers_mod):
        for mname, mod in layer.named_modules():
            if isinstance(mod, torch.nn.Linear):
                linear_params += mod.weight.numel()
                if i == 0:
                    linears.append(LinearShape(mname.rsplit(".", 1)[-1], mod.in_features, mod.out_features))
    heads = int(text.num_attention_heads)
    hidden = int(text.hidden_size)
    head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
    return Arch(
        name=name, hidden=hidden, intermediate=int(text.intermediate_size), layers=len(layers_mod), heads=heads,
        kv_heads=int(getattr(text, "num_key_value_heads", None) or heads), head_dim=head_dim,
        vocab=int(text.vocab_size), tied=bool(getattr(text, "tie_word_embeddings", False)), params=params,
        linear_params=linear_params, layer_linears=tuple(linears),
    )


def _decoder_layers(model: Any) -> Any:
    import torch

    for mod in model.modules():
        for attr in ("layers", "h", "blocks"):
            seq = getattr(mod, attr, None)
            if isinstance(seq, torch.nn.ModuleList) and len(seq):
                return seq
    raise TunelabError(f"{type(model).__name__}: cannot find its decoder layers", 2)
