"""Tiny in-process models and a locally built byte-level tokenizer for fast tests (no downloads).

`tiny_tokenizer()` is a real fast tokenizer (offsets, chat template, special tokens); `tiny_model()` a 2-layer
Llama with hidden size 64. `save_tiny(dir)` writes both as a Hugging Face model folder usable as `model.name`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def tiny_tokenizer() -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # Byte-level: every byte is a token; no training needed and any text round-trips.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIALS)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    tok.chat_template = CHATML
    return tok


def tiny_config(vocab_size: int = 259, **kw: Any) -> Any:
    from transformers import LlamaConfig

    cfg = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=258,
        pad_token_id=256,
        # Larger than Llama's 0.02 so a frozen random LM head can still express a peaked distribution:
        # LoRA (which leaves lm_head alone) must be able to overfit in a few steps.
        initializer_range=0.2,
    )
    cfg.update(kw)
    return LlamaConfig(**cfg)


def tiny_model(seed: int = 0, dtype: torch.dtype = torch.float32, **kw: Any) -> Any:
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    model = LlamaForCausalLM(tiny_config(vocab_size=len(tok), **kw)).to(dtype)
    model.config.use_cache = False
    return model


def save_tiny(path: str | Path, seed: int = 0, **kw: Any) -> Path:
    p = Path(path)
    tiny_model(seed, **kw).save_pretrained(p)
    tiny_tokenizer().save_pretrained(p)
    return p


def chat_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """n small, distinct OpenAI-format examples: a deterministic, learnable mapping."""
    import random

    rng = random.Random(seed)
    words = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "fish", "bird"]
    rows = []
    for i in range(n):
        a, b = rng.choice(words), rng.choice(words)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"echo {a} {b} {i}"},
                    {"role": "assistant", "content": f"{a} {b}"},
                ]
            }
        )
    return rows


def write_jsonl(path: str | Path, rows: list[Any]) -> Path:
    p = Path(path)
    p.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return p
