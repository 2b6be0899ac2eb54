"""The engine checked against Hugging Face `generate` (vLLM's check_outputs_equal / check_logprobs_close):
greedy tokens equal and per-token log-probs within 1e-4 (fp32), each request's reference being HF generating
it alone. Covered: a mixed-length batch through the sync sampler, the same batch with rows joining a running
batch (batch size 2), adapters (one adapter through the sync sampler; base + two adapters mixed in one server
batch, joining as rows finish), and SmolLM2-135M-Instruct with its chat template (slow)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.engine.sync import sample, stop_rule
from tunelab.engine.types import GenerationRequest, SamplingParams
from tunelab.model.loading import load_model

PROMPTS = ["hello there", "the quick brown fox jumps", "x", "a longer prompt with more words in it, yes", "abc"]
MAX_TOKENS = [12, 5, 9, 16, 3]  # rows finish at different steps, so waiting rows join mid-batch


def hf_reference(model: Any, tok: Any, ids: list[int], max_tokens: int) -> tuple[list[int], list[float]]:
    """HF greedy generation of one prompt alone: its tokens (stop token included) and their log-probs."""
    stops = sorted(stop_rule(tok).stop_ids)
    x = torch.tensor([ids])
    out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=stops, pad_token_id=tok.pad_token_id, output_logits=True,
                         return_dict_in_generate=True, temperature=None, top_p=None, top_k=None)
    new = out.sequences[0, len(ids):].tolist()
    logps = [float(torch.log_softmax(step[0].float(), -1)[t]) for step, t in zip(out.logits, new, strict=False)]
    if any(t in stops for t in new):
        new = new[: next(i for i, t in enumerate(new) if t in stops) + 1]
    return new, logps[: len(new)]


def check_close(got: list[tuple[list[int], list[float]]], want: list[tuple[list[int], list[float]]]) -> None:
    for i, ((g_ids, g_lp), (w_ids, w_lp)) in enumerate(zip(got, want, strict=True)):
        assert g_ids == w_ids, f"row {i}: tokens differ"
        assert torch.allclose(torch.tensor(g_lp), torch.tensor(w_lp), atol=1e-4, rtol=0), f"row {i}: log-probs differ"


def ids_of(tok: Any, prompts: list[str]) -> list[list[int]]:
    return [list(tok(p)["input_ids"]) for p in prompts]


@pytest.fixture(scope="module")
def base(lora_base_dir: Path) -> tuple[Any, Any]:
    model, tok = load_model(str(lora_base_dir), dtype="fp32")
    return model.eval(), tok


@pytest.mark.parametrize("batch_size", [8, 2], ids=["one_batch", "joining"])
def test_sync_sampler_matches_hf_on_a_mixed_length_batch(base: tuple[Any, Any], batch_size: int) -> None:
    model, tok = base
    prompts = ids_of(tok, PROMPTS)
    want = [hf_reference(model, tok, p, n) for p, n in zip(prompts, MAX_TOKENS, strict=True)]
    params = [SamplingParams(n, 0.0, logprobs=True) for n in MAX_TOKENS]
    outs = sample(model, tok, prompts, params, max_batch_size=batch_size)
    check_close([(o.token_ids, o.logprobs or []) for o in outs], want)
    assert [o.finish_reason for o in outs] == ["stop" if w[0][-1] in stop_rule(tok).stop_ids else "length"
                                               for w in want]


def test_sync_sampler_matches_hf_with_an_adapter(lora_base_dir: Path, tiny_adapters: Path) -> None:
    from peft import PeftModel

    model, tok = load_model(str(lora_base_dir), dtype="fp32")
    peft_model = PeftModel.from_pretrained(model, str(tiny_adapters / "alpha")).eval()
    prompts = ids_of(tok, PROMPTS)
    want = [hf_reference(peft_model, tok, p, n) for p, n in zip(prompts, MAX_TOKENS, strict=True)]
    outs = sample(peft_model, tok, prompts, [SamplingParams(n, 0.0, logprobs=True) for n in MAX_TOKENS],
                  max_batch_size=2)
    check_close([(o.token_ids, o.logprobs or []) for o in outs], want)


def test_server_engine_matches_hf_for_base_and_adapters_mixed_and_joining(
    lora_base_dir: Path, tiny_adapters: Path
) -> None:
    """Base, alpha and beta requests in one mixed batch of 2 rows: the rest join as rows finish."""
    from peft import PeftModel

    from tunelab.engine.engine import Engine

    jobs = list(zip(["tiny", "alpha", "beta", "alpha", "tiny"], PROMPTS, MAX_TOKENS, strict=True))
    ref_base, tok = load_model(str(lora_base_dir), dtype="fp32")
    refs: dict[str, Any] = {"tiny": ref_base.eval()}
    for name, folder in (("alpha", tiny_adapters / "alpha"), ("beta", tiny_adapters / "beta" / "adapter")):
        m, _ = load_model(str(lora_base_dir), dtype="fp32")
        refs[name] = PeftModel.from_pretrained(m, str(folder)).eval()
    want = [hf_reference(refs[m], tok, list(tok(p)["input_ids"]), n) for m, p, n in jobs]

    model, tok2 = load_model(str(lora_base_dir), dtype="fp32")
    engine = Engine(model, tok2, base_name="tiny", adapters_dir=tiny_adapters, max_batch_size=2, batch_wait_s=0.05)
    try:
        async def go() -> list[tuple[list[int], list[float]]]:
            streams = [await engine.submit(GenerationRequest(m, SamplingParams(n, 0.0, logprobs=True), prompt=p))
                       for m, p, n in jobs]

            async def drain(s: Any) -> tuple[list[int], list[float]]:
                async for _ in s:
                    pass
                seq = s._seq
                return seq.generated + ([seq.stop_token] if seq.stop_token is not None else []), s.logprobs

            return list(await asyncio.gather(*(drain(s) for s in streams)))

        got = asyncio.run(go())
        assert engine.stats["joined"] >= 1  # some requests joined a running batch
    finally:
        engine.close()
    check_close(got, want)


@pytest.mark.slow
def test_smollm2_sync_sampler_matches_hf() -> None:
    from tunelab.engine.sync import chat_prompt_ids

    model, tok = load_model("smollm2-135m-instruct", dtype="fp32")
    model.eval()
    questions = ["What is the capital of France?", "Name three colours.", "Say hi.", "What is 2 + 2? Answer briefly."]
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in questions]
    budgets = [24, 12, 8, 16]
    want = [hf_reference(model, tok, p, n) for p, n in zip(prompts, budgets, strict=True)]
    for batch_size in (4, 2):
        outs = sample(model, tok, prompts, [SamplingParams(n, 0.0, logprobs=True) for n in budgets],
                      max_batch_size=batch_size)
        check_close([(o.token_ids, o.logprobs or []) for o in outs], want)


@pytest.mark.slow
def test_smollm2_with_an_adapter_matches_hf(tmp_path: Path) -> None:
    from peft import LoraConfig, PeftModel, get_peft_model

    from tunelab.engine.sync import chat_prompt_ids

    model, tok = load_model("smollm2-135m-instruct", dtype="fp32")
    torch.manual_seed(0)
    pm = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                                          task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in pm.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.05)
    pm.save_pretrained(tmp_path / "a")
    base, _ = load_model("smollm2-135m-instruct", dtype="fp32")
    peft_model = PeftModel.from_pretrained(base, str(tmp_path / "a")).eval()
    prompts = [chat_prompt_ids(tok, [{"role": "user", "content": q}]) for q in ("Hello!", "What is the sun?")]
    want = [hf_reference(peft_model, tok, p, 12) for p in prompts]
    outs = sample(peft_model, tok, prompts, SamplingParams(12, 0.0, logprobs=True), max_batch_size=2)
    check_close([(o.token_ids, o.logprobs or []) for o in outs], want)
