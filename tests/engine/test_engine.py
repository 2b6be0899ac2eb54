"""The real engine on a tiny Llama with two random LoRA adapters: routing, mixed-adapter batching,
LRU eviction, refusal of bad adapters, stop strings, sampling, cancellation, merged mode."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from lora_fixtures import make_adapter, make_tiny_model_dir

from tunelab.engine.engine import Engine
from tunelab.engine.types import (
    AdapterError,
    EngineError,
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    SamplingParams,
)
from tunelab.model.loading import load_model

PROMPTS = ["hello there", "the quick brown fox", "x", "a longer prompt with more words in it", "abc", "zz top"]


def make_engine(lora_base_dir: Path, **kw: Any) -> Engine:
    model, tok = load_model(str(lora_base_dir), dtype="fp32")
    return Engine(model, tok, base_name="tiny", **kw)


@pytest.fixture
def engine(lora_base_dir: Path, tiny_adapters: Path):  # type: ignore[no-untyped-def]
    e = make_engine(lora_base_dir, adapters_dir=tiny_adapters)
    yield e
    e.close()


async def run(engine: Engine, model: str, prompt: str, **sp: Any) -> tuple[str, list[int], str | None, int]:
    sampling = SamplingParams(**{"max_tokens": 10, "temperature": 0.0, **sp})
    stream = await engine.submit(GenerationRequest(model, sampling, prompt=prompt))
    text, reason, n = [], None, 0
    async for ev in stream:
        text.append(ev.text)
        reason, n = ev.finish_reason, ev.completion_tokens
    return "".join(text), stream.token_ids, reason, n  # type: ignore[attr-defined]


async def run_many(engine: Engine, jobs: list[tuple[str, str]], **sp: Any) -> list[list[int]]:
    results = await asyncio.gather(*(run(engine, m, p, **sp) for m, p in jobs))
    return [r[1] for r in results]


def test_discovers_folders_and_run_folders(engine: Engine) -> None:
    models = {m.id: m for m in engine.list_models()}
    assert set(models) == {"tiny", "alpha", "beta"}  # beta is a run folder: beta/adapter/
    assert models["alpha"].parent == "tiny" and models["tiny"].parent is None


def test_base_and_adapters_give_different_greedy_outputs(engine: Engine) -> None:
    outs = {m: asyncio.run(run(engine, m, "hello there"))[1] for m in ("tiny", "alpha", "beta")}
    assert len({tuple(v) for v in outs.values()}) == 3
    assert all(len(v) == 10 for v in outs.values())


def test_mixed_adapter_batch_matches_each_request_alone(lora_base_dir: Path, tiny_adapters: Path) -> None:
    # Without joining mid-batch, so the batch count shows the six requests shared one forward pass.
    engine = make_engine(lora_base_dir, adapters_dir=tiny_adapters, continuous_batching=False)
    try:
        jobs = [(m, p) for m, p in zip(["tiny", "alpha", "beta", "alpha", "beta", "tiny"], PROMPTS, strict=True)]
        alone = [asyncio.run(run(engine, m, p))[1] for m, p in jobs]
        before = dict(engine.stats)
        together = asyncio.run(run_many(engine, jobs))
        assert engine.stats["batches"] - before["batches"] == 1  # one forward pass served all three models
        assert engine.stats["rows"] - before["rows"] == len(jobs)
        assert together == alone
    finally:
        engine.close()


def test_one_adapter_at_a_time_mode_gives_same_tokens(lora_base_dir: Path, tiny_adapters: Path, engine: Engine) -> None:
    jobs = [("alpha", "hello there"), ("beta", "hello there"), ("tiny", "abc"), ("alpha", "zz top")]
    mixed = asyncio.run(run_many(engine, jobs))
    single = make_engine(lora_base_dir, adapters_dir=tiny_adapters, mixed_batching=False)
    try:
        assert asyncio.run(run_many(single, jobs)) == mixed
        assert single.stats["batches"] >= 3  # one per adapter
    finally:
        single.close()


def test_lru_eviction_and_reload(lora_base_dir: Path, tiny_adapters: Path) -> None:
    e = make_engine(lora_base_dir, adapters_dir=tiny_adapters, max_loaded_adapters=1)
    try:
        first = asyncio.run(run(e, "alpha", "hello there"))[1]
        assert e.health()["loaded_adapters"] == ["alpha"]
        asyncio.run(run(e, "beta", "hello there"))
        assert e.health()["loaded_adapters"] == ["beta"] and e.stats["adapter_evictions"] == 1
        again = asyncio.run(run(e, "alpha", "hello there"))[1]
        assert again == first and e.stats["adapter_loads"] == 3
        # Two adapters requested together with room for one: served in two batches, both correct.
        both = asyncio.run(run_many(e, [("alpha", "abc"), ("beta", "abc")]))
        assert both[0] == asyncio.run(run(e, "alpha", "abc"))[1]
        assert both[1] == asyncio.run(run(e, "beta", "abc"))[1]
    finally:
        e.close()


def test_adapter_for_another_base_is_refused(engine: Engine, tmp_path: Path) -> None:
    other = make_tiny_model_dir(tmp_path / "other", seed=3)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64)
    (other / "config.json").write_text(json.dumps(cfg))
    from transformers import AutoModelForCausalLM, LlamaConfig

    small = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    bad = make_adapter(other, tmp_path / "bad", seed=4, base_model=small)
    with pytest.raises(AdapterError, match=r"does not fit base model 'tiny'.*in-size 64 in the base but 32"):
        engine.register_adapter("bad", bad)
    assert "bad" not in {m.id for m in engine.list_models()}


def test_name_mismatch_alone_is_accepted(engine: Engine, tiny_adapters: Path, tmp_path: Path) -> None:
    moved = shutil.copytree(tiny_adapters / "alpha", tmp_path / "moved")
    cfg = json.loads((moved / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "/somewhere/else/tiny"
    (moved / "adapter_config.json").write_text(json.dumps(cfg))
    engine.register_adapter("moved", moved)
    assert asyncio.run(run(engine, "moved", "abc"))[1] == asyncio.run(run(engine, "alpha", "abc"))[1]


def test_unusable_folders_are_refused_with_clear_messages(engine: Engine, tiny_adapters: Path, tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="no adapter_config.json"):
        engine.register_adapter("x", tmp_path)
    ia3 = shutil.copytree(tiny_adapters / "alpha", tmp_path / "ia3")
    (ia3 / "adapter_config.json").write_text(json.dumps({"peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="only LoRA"):
        engine.register_adapter("x", ia3)
    noweights = shutil.copytree(tiny_adapters / "alpha", tmp_path / "nw")
    (noweights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="weights are missing"):
        engine.register_adapter("x", noweights)
    garbage = shutil.copytree(tiny_adapters / "alpha", tmp_path / "garbage")
    (garbage / "adapter_model.safetensors").write_bytes(b"not safetensors at all")
    with pytest.raises(AdapterError, match="not a readable safetensors"):
        engine.register_adapter("x", garbage)
    with pytest.raises(AdapterError, match="already served"):
        engine.register_adapter("alpha", tiny_adapters / "beta")


def test_bad_folder_in_adapters_dir_is_skipped(lora_base_dir: Path, tiny_adapters: Path, tmp_path: Path) -> None:
    root = shutil.copytree(tiny_adapters, tmp_path / "runs")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text("{ not json")
    (root / "not-an-adapter").mkdir()
    e = make_engine(lora_base_dir, adapters_dir=root)
    try:
        assert {m.id for m in e.list_models()} == {"tiny", "alpha", "beta"}
        assert any("broken" in k for k in e.health()["rejected_adapters"])
        # A run that finishes while serving is picked up on the next look.
        shutil.copytree(tiny_adapters / "alpha", root / "gamma")
        assert "gamma" in {m.id for m in e.list_models()}
        assert asyncio.run(run(e, "gamma", "abc"))[2] == "length"
    finally:
        e.close()


def test_adapter_that_breaks_after_registration_fails_only_its_requests(engine: Engine, tiny_adapters: Path,
                                                                        tmp_path: Path) -> None:
    fragile = shutil.copytree(tiny_adapters / "alpha", tmp_path / "fragile")
    engine.register_adapter("fragile", fragile)
    (fragile / "adapter_model.safetensors").write_bytes(b"\x08" + b"\x00" * 7 + b"{}garbage")
    with pytest.raises(EngineError, match="could not be loaded"):
        asyncio.run(run(engine, "fragile", "abc"))
    assert asyncio.run(run(engine, "beta", "abc"))[2] == "length"
    assert engine.health()["worker_alive"]


def test_unknown_model_and_long_prompt(engine: Engine) -> None:
    with pytest.raises(ModelNotFoundError):
        asyncio.run(run(engine, "nope", "abc"))
    with pytest.raises(InvalidRequestError, match="context of 512"):
        asyncio.run(run(engine, "alpha", "x" * 500, max_tokens=20))
    # A default max_tokens (the client gave none) shrinks to the 12 tokens of room left instead.
    assert asyncio.run(run(engine, "alpha", "x" * 500, max_tokens=20, fit_to_context=True))[3] <= 12
    with pytest.raises(InvalidRequestError, match="token ids"):
        asyncio.run(engine.submit(GenerationRequest("tiny", SamplingParams(5), prompt=[1, 99999])))


def test_stop_string_and_max_tokens(engine: Engine) -> None:
    text, ids, reason, n = asyncio.run(run(engine, "alpha", "hello there", max_tokens=12))
    assert reason == "length" and n == 12 and len(ids) == 12
    stop = text[3:5]
    cut, _, reason2, _ = asyncio.run(run(engine, "alpha", "hello there", max_tokens=12, stop=(stop,)))
    assert reason2 == "stop" and cut == text[: text.index(stop)]


def test_chat_messages_use_the_chat_template(engine: Engine, lora_base_dir: Path) -> None:
    from transformers import AutoTokenizer

    templated = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids = AutoTokenizer.from_pretrained(lora_base_dir)(templated, add_special_tokens=False)["input_ids"]

    async def go(**kw: Any) -> tuple[int, list[int]]:
        s = await engine.submit(GenerationRequest("beta", SamplingParams(6, 0.0), **kw))
        async for _ in s:
            pass
        return s.prompt_tokens, s.token_ids  # type: ignore[attr-defined]

    chat = asyncio.run(go(messages=[{"role": "user", "content": "hi"}]))
    assert chat == asyncio.run(go(prompt=ids))
    assert chat[0] == len(ids) and len(chat[1]) == 6


def test_seeded_sampling_repeats_and_differs_by_seed(engine: Engine) -> None:
    a = asyncio.run(run(engine, "alpha", "abc", temperature=1.0, top_p=0.9, seed=11, max_tokens=16))[1]
    b = asyncio.run(run(engine, "alpha", "abc", temperature=1.0, top_p=0.9, seed=11, max_tokens=16))[1]
    c = asyncio.run(run(engine, "alpha", "abc", temperature=1.0, top_p=0.9, seed=12, max_tokens=16))[1]
    assert a == b and a != c


def test_cancel_stops_generation(engine: Engine) -> None:
    async def go() -> tuple[int, str | None]:
        s = await engine.submit(GenerationRequest("alpha", SamplingParams(400, 0.0), prompt="abc"))
        async for ev in s:
            if ev.completion_tokens >= 2:
                break  # leaving the loop closes the stream, which cancels the sequence
        other = await run(engine, "beta", "abc", max_tokens=3)
        return other[3], other[2]

    before = engine.stats["tokens"]
    n, reason = asyncio.run(go())
    assert (n, reason) == (3, "length")
    assert engine.stats["tokens"] - before < 100  # the cancelled request did not run to 400 tokens


def test_merged_mode_matches_unmerged_adapter(lora_base_dir: Path, tiny_adapters: Path, engine: Engine) -> None:
    want = asyncio.run(run(engine, "beta", "hello there"))[1]
    merged = make_engine(lora_base_dir, adapters_dir=tiny_adapters)
    try:
        merged.merge("beta")
        assert [m.id for m in merged.list_models()] == ["beta"]
        assert asyncio.run(run(merged, "beta", "hello there"))[1] == want
        with pytest.raises(ModelNotFoundError, match="only merged adapter 'beta'"):
            asyncio.run(run(merged, "tiny", "abc"))
    finally:
        merged.close()


def test_register_and_unregister_while_running(engine: Engine, tiny_adapters: Path) -> None:
    info = engine.register_adapter("ft:tiny:acme:v1", tiny_adapters / "alpha", owned_by="acme")
    assert info.owned_by == "acme" and info.parent == "tiny"
    got = asyncio.run(run(engine, "ft:tiny:acme:v1", "abc"))[1]  # dots/colons in a name are fine
    assert got == asyncio.run(run(engine, "alpha", "abc"))[1]
    engine.unregister_adapter("ft:tiny:acme:v1")
    with pytest.raises(ModelNotFoundError):
        asyncio.run(run(engine, "ft:tiny:acme:v1", "abc"))
    engine.register_adapter("ft:tiny:acme:v1", tiny_adapters / "beta")  # same name, new weights
    assert asyncio.run(run(engine, "ft:tiny:acme:v1", "abc"))[1] == asyncio.run(run(engine, "beta", "abc"))[1]


def test_requests_join_a_running_batch_and_match_alone(engine: Engine) -> None:
    jobs = [("alpha", "hello there"), ("beta", "abc"), ("tiny", "zz top"), ("beta", "the quick brown fox")]
    # The first request is long so the others are sure to arrive while its batch is decoding.
    lengths = [48, 12, 12, 12]
    alone = [asyncio.run(run(engine, m, p, max_tokens=n))[1] for (m, p), n in zip(jobs, lengths, strict=True)]

    async def staggered() -> list[list[int]]:
        started = engine.stats["batches"]
        first = asyncio.ensure_future(run(engine, *jobs[0], max_tokens=lengths[0]))
        for _ in range(2000):  # wait (not a fixed sleep: machine load varies) until its batch has started
            if engine.stats["batches"] > started:
                break
            await asyncio.sleep(0.005)
        rest = await asyncio.gather(*(run(engine, m, p, max_tokens=12) for m, p in jobs[1:]))
        return [(await first)[1], *(r[1] for r in rest)]

    before = dict(engine.stats)
    got = asyncio.run(staggered())
    assert got == alone
    assert engine.stats["joined"] - before["joined"] >= 1, (before, dict(engine.stats))  # at least one joined mid-batch


def test_base_only_batch_admits_only_base_until_an_adapter_is_loaded(lora_base_dir: Path, tiny_adapters: Path) -> None:
    e = make_engine(lora_base_dir, adapters_dir=tiny_adapters)  # no adapter loaded yet: the bare model runs
    try:
        jobs = [("tiny", "hello there"), ("alpha", "abc"), ("tiny", "abc")]
        alone = [asyncio.run(run(e, m, p, max_tokens=12))[1] for m, p in jobs]
        e.close()
        e = make_engine(lora_base_dir, adapters_dir=tiny_adapters)

        async def staggered() -> list[list[int]]:
            first = asyncio.ensure_future(run(e, *jobs[0], max_tokens=12))
            await asyncio.sleep(0.05)
            rest = await asyncio.gather(*(run(e, m, p, max_tokens=12) for m, p in jobs[1:]))
            return [(await first)[1], *(r[1] for r in rest)]

        assert asyncio.run(staggered()) == alone
    finally:
        e.close()


def test_a_runs_system_prompt_is_added_to_chat_requests_without_one(
        engine: Engine, tiny_adapters: Path, tmp_path: Path) -> None:
    """A run trained with `data.system_prompt` is served with it (read from the config.yaml beside adapter/),
    as train, eval and generate render it; a request's own system message wins. Same adapter weights twice:
    `plain` (a bare folder, no config) and `sysrun` (a run folder whose config names a system prompt)."""
    run = tmp_path / "sysrun"
    shutil.copytree(tiny_adapters / "alpha", run / "adapter")
    (run / "config.yaml").write_text("data:\n  system_prompt: Answer in JSON.\n")
    shutil.copytree(tiny_adapters / "alpha", tmp_path / "plain")
    engine.register_adapter("sysrun", run)
    engine.register_adapter("plain", tmp_path / "plain")

    async def chat(model: str, messages: list[dict[str, str]]) -> tuple[int, list[int]]:
        stream = await engine.submit(GenerationRequest(model, SamplingParams(max_tokens=6, temperature=0.0),
                                                       messages=messages))
        async for _ in stream:
            pass
        return stream.prompt_tokens, stream.token_ids  # type: ignore[attr-defined]

    user = [{"role": "user", "content": "hello there"}]
    spelled = [{"role": "system", "content": "Answer in JSON."}, *user]
    own = [{"role": "system", "content": "Be brief."}, *user]
    assert asyncio.run(chat("sysrun", user)) == asyncio.run(chat("plain", spelled))
    assert asyncio.run(chat("sysrun", user))[0] > asyncio.run(chat("plain", user))[0]
    assert asyncio.run(chat("sysrun", own)) == asyncio.run(chat("plain", own))
