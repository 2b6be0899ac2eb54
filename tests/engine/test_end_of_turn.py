"""One end-of-turn rule: derived from the chat template, it is the token the label mask trains on at the end of
each assistant turn and the token generation stops on. Three templates built locally: ChatML (SmolLM2-like),
Llama 3 style (whose EOS is not the turn's end) and a template without a system role (Gemma style)."""

from __future__ import annotations

from typing import Any

import pytest

from tunelab.data.records import Conversation, Message
from tunelab.data.templates import IGNORE_INDEX, encode, end_of_turn

SMOL = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


def byte_tokenizer(specials: list[str], template: str, **named: str) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    tk = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(sorted(alphabet))}, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, **named)
    tok.chat_template = template
    return tok


TEMPLATES = {
    "chatml": (lambda: byte_tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], SMOL, bos_token="<|im_start|>",
                                      eos_token="<|im_end|>", pad_token="<|im_end|>"), "<|im_end|>"),
    # Llama 3 base tokenizers name <|end_of_text|> as EOS, yet an assistant turn ends with <|eot_id|>.
    "llama3": (lambda: byte_tokenizer(["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>",
                                       "<|end_header_id|>", "<|eot_id|>"], LLAMA3, bos_token="<|begin_of_text|>",
                                      eos_token="<|end_of_text|>", pad_token="<|end_of_text|>"), "<|eot_id|>"),
    "no_system": (lambda: byte_tokenizer(["<bos>", "<eos>", "<pad>", "<start_of_turn>", "<end_of_turn>"], GEMMA,
                                         bos_token="<bos>", eos_token="<eos>", pad_token="<pad>"), "<end_of_turn>"),
}

CONV = Conversation((Message("user", "hi there"), Message("assistant", "first reply"), Message("user", "more?"),
                     Message("assistant", "second")))


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_marker_is_derived_from_the_template(name: str) -> None:
    make, marker = TEMPLATES[name]
    tok = make()
    eot = end_of_turn(tok)
    assert eot.text == marker
    assert eot.token_id == tok.convert_tokens_to_ids(marker)
    assert eot.stop_ids == {eot.token_id, tok.eos_token_id}
    assert eot.stop_strings == ()
    assert end_of_turn(tok) is eot  # derived once per tokenizer


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_label_mask_trains_each_turn_through_the_marker(name: str) -> None:
    make, marker = TEMPLATES[name]
    tok = make()
    enc = encode(tok, CONV)
    eot_id = end_of_turn(tok).token_id
    # The trained runs of tokens: one per assistant turn, each its content then the marker token, no more.
    runs: list[list[int]] = []
    prev = False
    for tid, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(tid)
        prev = lab != IGNORE_INDEX
    assert [tok.decode(r[:-1]) for r in runs] == ["first reply", "second"]
    assert [r[-1] for r in runs] == [eot_id, eot_id]
    if name == "llama3":
        assert tok.eos_token_id not in enc.input_ids  # what the old eos-based mask looked for, in vain


def test_template_without_a_closing_marker_falls_back_to_eos() -> None:
    tok = byte_tokenizer(["<s>", "</s>"], "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}", bos_token="<s>", eos_token="</s>")
    eot = end_of_turn(tok)
    # "\n" after a reply is layout: nothing closes the turn, the model is expected to emit EOS.
    assert eot.text == "" and eot.stop_ids == {tok.eos_token_id}


def test_multi_token_marker_becomes_a_stop_string() -> None:
    tok = byte_tokenizer(["<s>", "</s>"], "{% for m in messages %}### {{ m['role'] }}\n{{ m['content'] }}\n### END"
                         "\n{% endfor %}{% if add_generation_prompt %}### assistant\n{% endif %}",
                         bos_token="<s>", eos_token="</s>")
    eot = end_of_turn(tok)
    assert eot.text == "### END" and eot.token_id is None and eot.stop_strings == ("### END",)
    enc = encode(tok, Conversation((Message("user", "a"), Message("assistant", "b"))))
    trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])
    assert trained == "b\n### END"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_generation_stops_on_the_marker(name: str) -> None:
    """A model whose every next token is the marker: the sampler stops after one token, whatever EOS is."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tunelab.engine.sync import sample_chat
    from tunelab.engine.types import SamplingParams

    make, marker = TEMPLATES[name]
    tok = make()
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1))
    head = torch.nn.Linear(32, len(tok), bias=True)
    with torch.no_grad():  # logits = the bias: the marker always wins
        head.weight.zero_()
        head.bias.zero_()
        head.bias[tok.convert_tokens_to_ids(marker)] = 1.0
    model.lm_head = head
    (out,) = sample_chat(model, tok, [[{"role": "user", "content": "hello"}]], SamplingParams(5, 0.0))
    assert out.token_ids == [tok.convert_tokens_to_ids(marker)]
    assert out.finish_reason == "stop" and out.text == ""
