"""End to end on the real SmolLM2-135M-Instruct: its chat template, the base and a random LoRA adapter
served side by side in one batch (slow: loads the real model)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tunelab.engine.engine import Engine
from tunelab.engine.types import GenerationRequest, SamplingParams


@pytest.mark.slow
def test_smollm2_base_and_adapter_in_one_batch(tmp_path: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model

    engine = Engine.from_pretrained("smollm2-135m-instruct", dtype="fp32", served_model_name="smol")
    try:
        torch.manual_seed(0)
        cfg = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type="CAUSAL_LM")
        peft_model = get_peft_model(engine._base, cfg)
        with torch.no_grad():
            for name, p in peft_model.named_parameters():
                if "lora_" in name:
                    p.normal_(0, 0.2)
        peft_model.save_pretrained(tmp_path / "rand")
        engine._base = peft_model.unload()  # the engine's base is back to plain weights
        engine.register_adapter("rand", tmp_path / "rand")

        async def both() -> list[tuple[str, int, str | None]]:
            msgs = [{"role": "user", "content": "What is the capital of France?"}]
            streams = [await engine.submit(GenerationRequest(m, SamplingParams(12, 0.0), messages=msgs))
                       for m in ("smol", "rand")]
            out = []
            for s in streams:
                text, reason = "", None
                async for ev in s:
                    text += ev.text
                    reason = ev.finish_reason
                out.append((text, s.prompt_tokens, reason))
            return out

        (base_text, prompt_tokens, reason), (rand_text, _, _) = asyncio.run(both())
        assert prompt_tokens > 10  # SmolLM2's template adds its system prompt and role markers
        assert "Paris" in base_text and reason in ("stop", "length")
        assert rand_text != base_text
    finally:
        engine.close()
