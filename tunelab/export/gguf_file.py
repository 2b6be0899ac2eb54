"""Write a Llama-architecture Hugging Face model and its tokenizer as one GGUF file (llama.cpp, Ollama, LM Studio).

Owns the mapping from a loaded `LlamaForCausalLM` + fast tokenizer to GGUF: the model hyperparameters
(`llama.*` keys), tensors renamed with gguf-py's own tensor map (`blk.N.attn_q.weight` ...), the tokenizer as
llama.cpp's byte-level BPE (`tokenizer.ggml.model = gpt2`: tokens, token types, merges, special ids, the chat
template) and the weight type (f32, f16, or q8_0 through `gguf.quants`). Writing is gguf-py's `GGUFWriter`;
nothing here reimplements the file format. Knows nothing about run folders or adapters (see `tunelab.export`).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from tunelab.errors import TunelabError

log = logging.getLogger(__name__)

Quant = Literal["f32", "f16", "q8_0"]
QUANTS: tuple[Quant, ...] = ("f32", "f16", "q8_0")
SUPPORTED_MODEL_TYPES = ("llama",)


@dataclass(frozen=True)
class GGUFSummary:
    """What was written: the file, its weight type, how many tensors and which llama.cpp pre-tokenizer."""

    path: Path
    quant: Quant
    tensors: int
    tokenizer_pre: str
    bytes: int


def _permute_for_ggml(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF stores Llama's q/k projections with the two rotary halves split (rotate_half); GGML's rope pairs
    adjacent dimensions, so rows are interleaved back per head, as llama.cpp's converter does."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rope_theta(cfg: Any) -> float:
    params = getattr(cfg, "rope_parameters", None)  # transformers >= 5
    if isinstance(params, dict) and params.get("rope_theta") is not None:
        kind = params.get("rope_type", "default")
        if kind not in ("default", None):
            raise TunelabError(f"GGUF export: rope scaling {kind!r} is not supported (only plain RoPE)", 2)
        return float(params["rope_theta"])
    scaling = getattr(cfg, "rope_scaling", None)
    if scaling:
        raise TunelabError(f"GGUF export: rope scaling {scaling!r} is not supported (only plain RoPE)", 2)
    return float(getattr(cfg, "rope_theta", 10000.0))


def _check_architecture(cfg: Any) -> None:
    kind = getattr(cfg, "model_type", None)
    if kind not in SUPPORTED_MODEL_TYPES:
        raise TunelabError(f"GGUF export supports Llama-architecture models (SmolLM2, Llama, TinyLlama ...); "
                           f"this model is {kind!r}", 2)
    for flag in ("attention_bias", "mlp_bias"):
        if getattr(cfg, flag, False):
            raise TunelabError(f"GGUF export: {flag}=true is not supported for llama", 2)


# ------------------------------------------------------------------------------------------------- tokenizer
def tokenizer_pre(tokenizer_json: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`): it picks the split regex.

    Read from the pre-tokenizer's structure: GPT-2's byte-level regex alone is `gpt-2`; digits split one by one
    before it is SmolLM's `smollm`. A byte-level BPE without merges tokenizes every byte alone, so any split
    gives the same ids (`gpt-2`). Anything else has no known equivalent and is refused rather than exported
    with a tokenizer that would quietly split text differently.
    """
    model = tokenizer_json.get("model") or {}
    if model.get("type") != "BPE":
        raise TunelabError(f"GGUF export supports byte-level BPE tokenizers; this one is {model.get('type')!r}", 2)
    pre = tokenizer_json.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") for s in steps]
    if not kinds or kinds[-1] != "ByteLevel":
        raise TunelabError(f"GGUF export: pre-tokenizer {kinds} is not byte-level BPE", 2)
    if not model.get("merges"):
        return "gpt-2"
    regex = steps[-1].get("use_regex", True)
    if kinds == ["ByteLevel"] and regex:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and regex:
        return "smollm"
    raise TunelabError(f"GGUF export: pre-tokenizer {json.dumps(pre)[:200]} has no known llama.cpp equivalent "
                       "(supported: GPT-2 byte-level, SmolLM digits + byte-level)", 2)


def _add_tokenizer(w: Any, tok: Any, vocab_size: int) -> str:
    """Tokens, types, merges, special ids and chat template; returns the pre-tokenizer name."""
    import gguf

    with tempfile.TemporaryDirectory(prefix="tunelab-gguf-tok-") as tmp:
        # The tokenizer as the engine uses it (pad and chat template as loaded), in HF's own file layout.
        tok.save_pretrained(tmp)
        tj = json.loads((Path(tmp) / "tokenizer.json").read_text(encoding="utf-8"))
        pre = tokenizer_pre(tj)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=vocab_size)
    vocab: dict[str, int] = tok.get_vocab()
    if len(vocab) > vocab_size:
        raise TunelabError(f"GGUF export: the tokenizer has {len(vocab)} tokens, the model's embedding "
                           f"only {vocab_size}", 2)
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i not in by_id:  # the embedding is padded past the tokenizer (llama.cpp's converter does the same)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    special.add_to_gguf(w, quiet=True)
    # Whether a plain encode adds BOS, read from the tokenizer itself rather than left to llama.cpp's default.
    probe = tok("a")["input_ids"]
    w.add_add_bos_token(bool(tok.bos_token_id is not None and probe and probe[0] == tok.bos_token_id))
    if special.chat_template is None and getattr(tok, "chat_template", None):
        w.add_chat_template(tok.chat_template)
    return pre


# --------------------------------------------------------------------------------------------------- tensors
def _tensors(model: Any) -> Iterator[tuple[str, np.ndarray]]:
    """(GGUF name, float32 array) for every weight, q/k permuted for GGML's rope."""
    import gguf

    cfg = model.config
    n_head, n_kv = int(cfg.num_attention_heads), int(cfg.num_key_value_heads or cfg.num_attention_heads)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, int(cfg.num_hidden_layers))
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    for hf_name, t in model.state_dict().items():
        if "rotary_emb" in hf_name or (tied and hf_name == "lm_head.weight"):
            continue  # computed at load time / the same tensor as token_embd
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise TunelabError(f"GGUF export: no llama.cpp name for tensor {hf_name!r}", 2)
        data = t.detach().to("cpu").float().numpy()
        if hf_name.endswith("self_attn.q_proj.weight"):
            data = _permute_for_ggml(data, n_head)
        elif hf_name.endswith("self_attn.k_proj.weight"):
            data = _permute_for_ggml(data, n_kv)
        yield name, data


def _encode(data: np.ndarray, quant: Quant) -> tuple[np.ndarray, Any]:
    """The array to store and its GGML type: 1-D tensors (norms) stay f32, as in llama.cpp's converter; q8_0
    falls back to f16 for a tensor whose rows do not split into 32-value blocks."""
    import gguf

    q = gguf.GGMLQuantizationType
    if data.ndim == 1 or quant == "f32":
        return data.astype(np.float32), q.F32
    if quant == "q8_0":
        try:
            return gguf.quants.quantize(data, q.Q8_0), q.Q8_0
        except gguf.quants.QuantError:
            log.info("q8_0: a tensor of shape %s does not fit 32-value blocks; kept as f16", data.shape)
    return data.astype(np.float16), q.F16


# ------------------------------------------------------------------------------------------------------ file
def write_gguf(model: Any, tok: Any, out: Path, *, quant: Quant = "f16", name: str = "") -> GGUFSummary:
    """Write `model` (a merged Llama `PreTrainedModel`) and `tok` as one GGUF file at `out` (atomic)."""
    import gguf

    if quant not in QUANTS:
        raise TunelabError(f"--quant must be one of {', '.join(QUANTS)}, got {quant!r}", 2)
    cfg = model.config
    _check_architecture(cfg)
    n_head = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // n_head)
    vocab_size = int(cfg.vocab_size)
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[quant]

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    w = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
    try:
        w.add_name(name or out.stem)
        w.add_file_type(file_type)
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
        w.add_vocab_size(vocab_size)
        w.add_context_length(int(cfg.max_position_embeddings))
        w.add_embedding_length(int(cfg.hidden_size))
        w.add_block_count(int(cfg.num_hidden_layers))
        w.add_feed_forward_length(int(cfg.intermediate_size))
        w.add_head_count(n_head)
        w.add_head_count_kv(int(cfg.num_key_value_heads or n_head))
        w.add_rope_dimension_count(head_dim)
        if head_dim != cfg.hidden_size // n_head:
            w.add_key_length(head_dim)
            w.add_value_length(head_dim)
        w.add_rope_freq_base(_rope_theta(cfg))
        w.add_layer_norm_rms_eps(float(cfg.rms_norm_eps))
        pre = _add_tokenizer(w, tok, vocab_size)
        count = 0
        for tname, data in _tensors(model):
            arr, qtype = _encode(data, quant)
            w.add_tensor(tname, arr, raw_dtype=qtype)  # q8_0 arrays are bytes; gguf-py derives the shape
            count += 1
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    finally:
        w.close()
    tmp.replace(out)
    return GGUFSummary(out, quant, count, pre, out.stat().st_size)
