"""Building an engine from a model name (4-bit too), merged mode through from_pretrained, and the
`tunelab serve` option parsing and start-up errors (clear message, exit code, no traceback)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tunelab.engine.cli import parse_adapter_option
from tunelab.engine.engine import Engine
from tunelab.engine.types import GenerationRequest, SamplingParams
from tunelab.errors import ConfigError, TunelabError


async def greedy(engine: Engine, jobs: list[tuple[str, str]]) -> list[list[int]]:
    async def one(model: str, prompt: str) -> list[int]:
        s = await engine.submit(GenerationRequest(model, SamplingParams(6, 0.0), prompt=prompt))
        async for _ in s:
            pass
        return s.token_ids  # type: ignore[attr-defined,no-any-return]

    return await asyncio.gather(*(one(m, p) for m, p in jobs))


def test_4bit_base_serves_adapters_with_mixed_batching(lora_base_dir: Path, tiny_adapters: Path) -> None:
    e = Engine.from_pretrained(str(lora_base_dir), load_in_4bit=True, adapters_dir=tiny_adapters,
                               served_model_name="tiny4")
    try:
        assert type(e._base.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit"
        jobs = [("tiny4", "hi"), ("alpha", "hi"), ("beta", "hi")]
        alone = [asyncio.run(greedy(e, [j]))[0] for j in jobs]
        assert asyncio.run(greedy(e, jobs)) == alone
        assert len({tuple(a) for a in alone}) == 3
    finally:
        e.close()


def test_from_pretrained_with_named_adapters_and_merge(lora_base_dir: Path, tiny_adapters: Path) -> None:
    plain = Engine.from_pretrained(str(lora_base_dir), dtype="fp32", adapters={"b": tiny_adapters / "beta"})
    try:
        want = asyncio.run(greedy(plain, [("b", "hello")]))
    finally:
        plain.close()
    merged = Engine.from_pretrained(str(lora_base_dir), dtype="fp32", adapters={"b": tiny_adapters / "beta"}, merge="b")
    try:
        assert [m.id for m in merged.list_models()] == ["b"]
        assert asyncio.run(greedy(merged, [("b", "hello")])) == want
    finally:
        merged.close()
    with pytest.raises(TunelabError, match="no adapter of that name") as err:
        Engine.from_pretrained(str(lora_base_dir), dtype="fp32", merge="nope")
    assert err.value.exit_code == 2


def test_parse_adapter_option(tmp_path: Path) -> None:
    assert parse_adapter_option("x=/a/b") == ("x", Path("/a/b"))
    assert parse_adapter_option(str(tmp_path / "my-run" / "adapter"))[0] == "my-run"
    assert parse_adapter_option(str(tmp_path / "plain"))[0] == "plain"
    with pytest.raises(ConfigError, match="NAME=PATH"):
        parse_adapter_option("=x")


def test_serve_refuses_bad_explicit_adapter_with_exit_2(lora_base_dir: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    with pytest.raises(SystemExit) as err:
        main(["serve", "--model", str(lora_base_dir), "--adapter", f"x={tmp_path / 'missing'}", "--port", "0"])
    assert err.value.code == 2
    assert "adapter folder not found" in capsys.readouterr().err
