"""`tunelab serve --engine vllm` on the real SmolLM2-135M with a LoRA adapter, through the official `openai`
client: models, chat, streaming, the adapter, a 404, auth; then greedy parity with our own engine on 20
prompts (10 on the base, 10 on the adapter): identical text on at least 18, the first 8 tokens on all.

Needs vLLM in its own environment (`make vllm`, or $TUNELAB_VLLM_PYTHON); skipped with the reason otherwise.
One vLLM process for the whole module (its startup is slow), stopped at the end.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from tunelab.errors import TunelabError

sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
from test_live_openai import Server, start_serve, stop  # noqa: E402

pytestmark = pytest.mark.slow

try:
    from tunelab.engine.vllm_process import find_vllm_python

    VLLM_PYTHON = find_vllm_python()
except TunelabError as e:
    pytest.skip(f"no vLLM environment: {e}", allow_module_level=True)

KEY = "sk-vllm-test"
MODEL = "smollm2-135m-instruct"
MAX_TOKENS = 32
PROMPTS = [
    "What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
    "How many legs does a spider have?", "Explain what a noun is.", "Give me a synonym for happy.",
    "What is 12 times 12?", "Describe a cat in one sentence.", "Why is the sky blue?",
    "List two fruits that are red.", "What does a thermometer measure?", "Say hello in Spanish.",
    "What is the opposite of cold?", "Suggest a name for a dog.", "What do bees make?",
    "How many days are in a week?", "What is water made of?", "Tell me a fun fact about the moon.",
    "Which planet is known as the red planet?", "What is the boiling point of water?",
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random LoRA adapter for SmolLM2 (small weights: it changes the text, it does not wreck it)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from tunelab.model.loading import load_model

    base, _ = load_model(MODEL, dtype="fp32")
    torch.manual_seed(7)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False,
                     task_type="CAUSAL_LM")
    pm = get_peft_model(base, cfg)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n:
                p.normal_(0, 0.04)
    out = tmp_path_factory.mktemp("vllm-adapter") / "ad0"
    pm.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def live(adapter: Path) -> Iterator[Server]:
    server = start_serve(["--engine", "vllm", "--model", MODEL, "--dtype", "fp32", "--adapter", f"ad0={adapter}",
                          "--api-key", KEY, "--max-loaded-adapters", "2", "--max-batch-size", "16"], timeout=1800)
    yield server
    assert stop(server) == 0  # SIGTERM: a clean stop, vLLM's process group ended with it
    assert server.lines[-1] == "server stopped"


@pytest.fixture
def client(live: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url, api_key=KEY, max_retries=0, timeout=300)


def test_models_chat_stream_adapter_and_errors(live: Server, client: openai.OpenAI) -> None:
    assert f"models: {MODEL}, ad0" in "\n".join(live.lines)
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {MODEL, "ad0"}
    assert getattr(models["ad0"], "parent", None) == MODEL

    outs = {}
    for model in (MODEL, "ad0"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello! Who are you?"}],
                                           temperature=0, max_tokens=16)
        assert r.model == model and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage is not None and r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        outs[model] = r.choices[0].message.content
    assert outs[MODEL] != outs["ad0"]  # the adapter is applied

    kw = {"model": "ad0", "messages": [{"role": "user", "content": "Tell me about bread."}], "temperature": 0,
          "max_tokens": 12}
    whole = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # streamed, not one blob
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    with pytest.raises(openai.NotFoundError) as nf:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}], max_tokens=2)
    assert nf.value.body["code"] == "model_not_found"  # type: ignore[index]
    bad = openai.OpenAI(base_url=live.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_greedy_parity_with_our_engine(client: openai.OpenAI, adapter: Path) -> None:
    from tunelab.engine.engine import Engine
    from tunelab.engine.types import GenerationRequest, SamplingParams

    jobs = [(MODEL if i % 2 == 0 else "ad0", p) for i, p in enumerate(PROMPTS)]

    def served(job: tuple[str, str]) -> str:
        r = client.chat.completions.create(model=job[0], messages=[{"role": "user", "content": job[1]}],
                                           temperature=0, max_tokens=MAX_TOKENS)
        return r.choices[0].message.content or ""

    with ThreadPoolExecutor(8) as pool:
        theirs = list(pool.map(served, jobs))

    ours_engine = Engine.from_pretrained(MODEL, dtype="fp32", device="cpu", adapters={"ad0": adapter})
    try:
        async def ours_all() -> list[tuple[str, list[int]]]:
            sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0)
            streams = [await ours_engine.submit(GenerationRequest(m, sp, messages=[{"role": "user", "content": p}]))
                       for m, p in jobs]

            async def collect(s: object) -> tuple[str, list[int]]:
                text = "".join([ev.text async for ev in s])  # type: ignore[attr-defined]
                return text, s.token_ids  # type: ignore[attr-defined]

            return list(await asyncio.gather(*(collect(s) for s in streams)))

        ours = asyncio.run(ours_all())
        tok = ours_engine._tok
    finally:
        ours_engine.close()

    same = sum(1 for (text, _), other in zip(ours, theirs, strict=True) if text == other)
    print(f"greedy parity: {same}/{len(jobs)} identical")  # shown with -s
    for (text, ids), other, job in zip(ours, theirs, jobs, strict=True):
        first8 = tok.decode(ids[:8], skip_special_tokens=True)
        assert other.startswith(first8), f"{job}: ours {text!r} vs vLLM {other!r}"
    assert same >= 18, [(o[0], t) for o, t in zip(ours, theirs, strict=True) if o[0] != t]
