"""`tunelab export --format gguf`: the file read back with gguf-py's `GGUFReader` (no llama.cpp needed): the
llama hyperparameters, the tokenizer (tokens in id order, types, merges, special ids, chat template), every tensor
under llama.cpp's name and shape, and the weights themselves: the trained adapter merged (not the base's), f16
within f16 rounding and q8_0 within its block error of the merged model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tiny
from export_fixtures import Exported, bpe_tokenizer

from tunelab.errors import TunelabError


def _reader(path: Path) -> Any:
    import gguf

    return gguf.GGUFReader(path)


def _meta(r: Any) -> dict[str, Any]:
    return {k: f.contents() for k, f in r.fields.items()}


def _merged(run: Path) -> tuple[Any, Any]:
    from tunelab.model.adapters import load_for_inference

    model, tok, _ = load_for_inference(str(run), dtype="fp32", merge=True)
    return model, tok


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of the exporter's rope interleave (HF's layout back from GGML's)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


@pytest.fixture(scope="module")
def merged(exported: Exported) -> tuple[Any, Any]:
    return _merged(exported.run)


def test_metadata_and_tokenizer(exported: Exported, merged: tuple[Any, Any]) -> None:
    import gguf

    model, tok = merged
    cfg = model.config
    m = _meta(_reader(exported.f16))
    assert m["general.architecture"] == "llama"
    assert m["general.file_type"] == gguf.LlamaFileType.MOSTLY_F16
    assert m["llama.block_count"] == cfg.num_hidden_layers == 2
    assert m["llama.embedding_length"] == 64 and m["llama.feed_forward_length"] == 128
    assert m["llama.attention.head_count"] == 4 and m["llama.attention.head_count_kv"] == 2
    assert m["llama.context_length"] == 512 and m["llama.rope.dimension_count"] == 16
    assert m["llama.rope.freq_base"] == pytest.approx(10000.0)
    assert m["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(cfg.rms_norm_eps)
    assert m["tokenizer.ggml.model"] == "gpt2" and m["tokenizer.ggml.pre"] == "gpt-2"
    vocab = tok.get_vocab()
    assert m["tokenizer.ggml.tokens"] == sorted(vocab, key=vocab.__getitem__)
    types = m["tokenizer.ggml.token_type"]
    for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        assert types[vocab[t]] == gguf.TokenType.CONTROL
    assert types[vocab["Ġred"]] == gguf.TokenType.NORMAL
    merges = m["tokenizer.ggml.merges"]
    want = [" ".join(p) for p in json.loads(tok.backend_tokenizer.to_str())["model"]["merges"]]
    assert merges == want and len(want) > 50
    assert all(len(x.split(" ")) == 2 for x in merges)
    assert m["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert m["tokenizer.ggml.eos_token_id"] == tok.eos_token_id == vocab["<|im_end|>"]
    assert m["tokenizer.ggml.add_bos_token"] is False  # our tokenizer adds nothing; prompts carry their markers
    assert m["tokenizer.chat_template"] == tok.chat_template


def test_tensor_names_shapes_types(exported: Exported) -> None:
    import gguf

    r = _reader(exported.f16)
    got = {t.name: (list(t.shape), t.tensor_type) for t in r.tensors}
    per_block = {"attn_norm": [64], "attn_q": [64, 64], "attn_k": [64, 32], "attn_v": [64, 32],
                 "attn_output": [64, 64], "ffn_norm": [64], "ffn_gate": [64, 128], "ffn_up": [64, 128],
                 "ffn_down": [128, 64]}
    want = {"token_embd.weight": [64, 320], "output_norm.weight": [64], "output.weight": [64, 320]}
    want |= {f"blk.{b}.{k}.weight": s for b in range(2) for k, s in per_block.items()}
    assert {k: v[0] for k, v in got.items()} == want  # GGML order: the fastest-varying dimension first
    f16, f32 = gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.F32
    assert all(ty == (f32 if len(s) == 1 else f16) for s, ty in got.values())


def test_weights_are_the_merged_model(exported: Exported, merged: tuple[Any, Any]) -> None:
    """Each GGUF tensor equals the merged model's (q/k un-permuted), and the trained adapter is in them."""
    import gguf
    from transformers import AutoModelForCausalLM

    model, _ = merged
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    base = AutoModelForCausalLM.from_pretrained(exported.base).state_dict()
    r = _reader(exported.f16)
    t = {x.name: np.asarray(x.data) for x in r.tensors}
    for b in range(2):
        q = _unpermute(t[f"blk.{b}.attn_q.weight"].astype(np.float32), 4)
        k = _unpermute(t[f"blk.{b}.attn_k.weight"].astype(np.float32), 2)
        np.testing.assert_allclose(q, sd[f"model.layers.{b}.self_attn.q_proj.weight"], atol=2e-3, rtol=1e-3)
        np.testing.assert_allclose(k, sd[f"model.layers.{b}.self_attn.k_proj.weight"], atol=2e-3, rtol=1e-3)
        v = t[f"blk.{b}.attn_v.weight"].astype(np.float32)
        np.testing.assert_allclose(v, sd[f"model.layers.{b}.self_attn.v_proj.weight"], atol=2e-3, rtol=1e-3)
        # The LoRA update moved v_proj by more than f16 rounding: the export holds W0 + BA, not W0.
        assert np.abs(v - base[f"model.layers.{b}.self_attn.v_proj.weight"].numpy()).max() > 1e-3
    np.testing.assert_array_equal(t["output_norm.weight"], sd["model.norm.weight"])  # f32 kept exactly

    q8 = {x.name: x for x in _reader(exported.q8).tensors}
    assert q8["blk.0.ffn_up.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0
    assert q8["blk.0.ffn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    up = gguf.quants.dequantize(np.asarray(q8["blk.0.ffn_up.weight"].data), gguf.GGMLQuantizationType.Q8_0)
    ref = sd["model.layers.0.mlp.up_proj.weight"]
    # q8_0: per 32-value block, d = max|x|/127 and x ~ round(x/d) * f16(d): at most half a step from rounding
    # plus 127 times f16's relative error (2^-11) of d.
    d = np.abs(ref.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    err = np.abs(up.reshape(-1, 32) - ref.reshape(-1, 32))
    assert (err <= d * (0.5 + 127 * 2**-11) + 1e-7).all()
    assert err.max() > 0  # really quantized
    assert _meta(_reader(exported.q8))["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q8_0
    assert exported.q8.stat().st_size < exported.f16.stat().st_size


def test_tied_embeddings_write_no_output_tensor(tmp_path: Path) -> None:
    from transformers import LlamaForCausalLM

    from tunelab.export.gguf_file import write_gguf

    tok = bpe_tokenizer()
    model = LlamaForCausalLM(tiny.tiny_config(vocab_size=len(tok), tie_word_embeddings=True))
    s = write_gguf(model, tok, tmp_path / "tied.gguf", quant="f32")
    names = {t.name for t in _reader(s.path).tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # llama.cpp reuses token_embd
    assert s.tensors == len(names) == 2 * 9 + 2


def test_tokenizer_pre_names() -> None:
    from tunelab.export.gguf_file import tokenizer_pre

    bpe = {"type": "BPE", "merges": [["a", "b"]]}
    assert tokenizer_pre({"model": bpe, "pre_tokenizer": {"type": "ByteLevel", "use_regex": True}}) == "gpt-2"
    smollm = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                    {"type": "ByteLevel", "use_regex": True}]}
    assert tokenizer_pre({"model": bpe, "pre_tokenizer": smollm}) == "smollm"
    no_merges = {"model": {"type": "BPE", "merges": []}, "pre_tokenizer": {"type": "ByteLevel", "use_regex": False}}
    assert tokenizer_pre(no_merges) == "gpt-2"
    with pytest.raises(TunelabError, match="no known llama.cpp equivalent"):
        tokenizer_pre({"model": bpe, "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": "x"}}, {"type": "ByteLevel", "use_regex": False}]}})
    with pytest.raises(TunelabError, match="byte-level BPE tokenizers; this one is 'Unigram'"):
        tokenizer_pre({"model": {"type": "Unigram"}, "pre_tokenizer": {"type": "Metaspace"}})


def test_refuses_other_architectures_and_quants(tmp_path: Path) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    from tunelab.export.gguf_file import write_gguf

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=300))
    with pytest.raises(TunelabError, match="Llama-architecture models .* this model is 'gpt2'"):
        write_gguf(gpt2, tiny.tiny_tokenizer(), tmp_path / "x.gguf")
    with pytest.raises(TunelabError, match="--quant must be one of f32, f16, q8_0, got 'q4_k'"):
        write_gguf(tiny.tiny_model(), tiny.tiny_tokenizer(), tmp_path / "x.gguf", quant="q4_k")  # type: ignore[arg-type]
    assert not list(tmp_path.iterdir())  # nothing half-written
