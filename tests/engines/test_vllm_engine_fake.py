"""`VllmEngine` without vLLM: the child process is a stand-in for vLLM's OpenAI server (fake_vllm/, same
module path, flags and key), so what tunelab sends and how it reads the stream are checked in seconds on a
tiny model. The real vLLM is tested in test_vllm_engine.py. Also: a missing vLLM environment is a clear error."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "engine"))
from lora_fixtures import make_adapter, make_tiny_model_dir  # noqa: E402

from tunelab.engine.types import (  # noqa: E402
    AdapterError,
    GenerationRequest,
    InvalidRequestError,
    ModelNotFoundError,
    SamplingParams,
)
from tunelab.engine.vllm_engine import VllmEngine  # noqa: E402
from tunelab.engine.vllm_process import find_vllm_python  # noqa: E402
from tunelab.errors import TunelabError  # noqa: E402

FAKE = Path(__file__).parent / "fake_vllm"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-fake")
    base = make_tiny_model_dir(root / "base")
    # An adapter for a narrower model (the pattern of tests/engine): refused before vLLM sees it.
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = make_tiny_model_dir(root / "other", seed=1)
    cfg = json.loads((other / "config.json").read_text())
    cfg.update(hidden_size=32, intermediate_size=64)
    small = AutoModelForCausalLM.from_config(LlamaConfig(**{k: v for k, v in cfg.items() if k != "architectures"}))
    return {"root": root, "base": base, "ad": make_adapter(base, root / "alpha", seed=1),
            "misfit": make_adapter(other, root / "misfit", seed=2, base_model=small), "record": root / "record.jsonl"}


@pytest.fixture(scope="module")
def engine(tiny: dict[str, Path]) -> Iterator[VllmEngine]:
    env = {"PYTHONPATH": os.pathsep.join([str(FAKE), os.environ.get("PYTHONPATH", "")]),
           "FAKE_VLLM_RECORD": str(tiny["record"])}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        eng = VllmEngine(str(tiny["base"]), python=sys.executable, served_model_name="tiny", dtype="fp32",
                         adapters={"alpha": tiny["ad"]}, startup_timeout=120)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    yield eng
    eng.close()


def last_sent(tiny: dict[str, Path]) -> dict[str, object]:
    return json.loads(tiny["record"].read_text().splitlines()[-1])  # type: ignore[no-any-return]


async def run(engine: VllmEngine, model: str, max_tokens: int = 5, **kw: object) -> tuple[list[object], int]:
    stream = await engine.submit(GenerationRequest(model, SamplingParams(max_tokens=max_tokens, temperature=0),
                                                   **kw))  # type: ignore[arg-type]
    return [ev async for ev in stream], stream.prompt_tokens


def test_chat_goes_as_our_token_ids_with_our_stop_rule(engine: VllmEngine, tiny: dict[str, Path]) -> None:
    from tunelab.engine.sync import chat_prompt_ids, stop_rule

    messages = [{"role": "user", "content": "hi there"}]
    events, prompt_tokens = asyncio.run(run(engine, "tiny", messages=messages))
    assert "".join(e.text for e in events) == " w0 w1 w2 w3 w4"  # type: ignore[attr-defined]
    assert [e.completion_tokens for e in events] == [1, 2, 3, 4, 5]  # type: ignore[attr-defined]
    assert events[-1].finish_reason == "length"  # type: ignore[attr-defined]
    sent = last_sent(tiny)
    assert sent["prompt"] == chat_prompt_ids(engine._tok, messages) and prompt_tokens == len(sent["prompt"])  # type: ignore[arg-type]
    assert sent["stop_token_ids"] == sorted(stop_rule(engine._tok).stop_ids)
    assert sent["temperature"] == 0 and sent["top_k"] == -1 and sent["stream"] is True


def test_adapters_load_under_internal_names_and_route(engine: VllmEngine, tiny: dict[str, Path]) -> None:
    assert [m.id for m in engine.list_models()] == ["tiny", "alpha"]
    assert engine.vllm_version == "0.0-fake"
    asyncio.run(run(engine, "alpha", prompt="x"))
    first = last_sent(tiny)["model"]
    assert first != "alpha" and first == engine._adapters["alpha"].internal
    # Re-registering a name after removal loads fresh weights under a new vLLM name.
    engine.unregister_adapter("alpha")
    with pytest.raises(ModelNotFoundError):
        asyncio.run(run(engine, "alpha", prompt="x"))
    engine.register_adapter("alpha", tiny["ad"], owned_by="bob")
    asyncio.run(run(engine, "alpha", prompt="x"))
    assert last_sent(tiny)["model"] not in (first, "alpha")
    assert next(m for m in engine.list_models() if m.id == "alpha").owned_by == "bob"


def test_bad_requests_and_adapters_are_engine_errors(engine: VllmEngine, tiny: dict[str, Path]) -> None:
    with pytest.raises(ModelNotFoundError):
        asyncio.run(run(engine, "nope", prompt="x"))
    with pytest.raises(InvalidRequestError, match="context"):
        asyncio.run(run(engine, "tiny", max_tokens=engine.max_model_len, prompt="x"))
    with pytest.raises(InvalidRequestError, match="token ids"):
        asyncio.run(run(engine, "tiny", prompt=[10**9]))
    with pytest.raises(AdapterError, match="does not fit"):
        engine.register_adapter("misfit", tiny["misfit"])
    with pytest.raises(AdapterError, match="not a PEFT adapter"):
        engine.register_adapter("empty", tiny["root"])
    with pytest.raises(AdapterError, match="base model's name"):
        engine.register_adapter("tiny", tiny["ad"])
    # vLLM's own 400 comes back as a 400, with its message.
    with pytest.raises(InvalidRequestError, match="non-negative"):
        asyncio.run(engine.submit(GenerationRequest("tiny", SamplingParams(max_tokens=2, temperature=-1),
                                                    prompt="x")))
    assert engine.health()["worker_alive"] is True


def test_close_stops_the_child(tiny: dict[str, Path], engine: VllmEngine) -> None:
    proc = engine._proc.proc
    engine.close()
    assert proc.poll() is not None
    with pytest.raises(Exception, match="not running"):
        asyncio.run(run(engine, "tiny", prompt="x"))


def test_missing_vllm_environment_says_make_vllm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TUNELAB_VLLM_PYTHON", raising=False)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("tunelab.engine.vllm_process._repo_root", lambda: tmp_path)
    with pytest.raises(TunelabError, match="make vllm"):
        find_vllm_python()
    monkeypatch.setenv("TUNELAB_VLLM_PYTHON", str(tmp_path / "missing" / "python"))
    with pytest.raises(TunelabError, match=r"\$TUNELAB_VLLM_PYTHON .*not an executable python"):
        find_vllm_python()


def test_serve_engine_vllm_without_vllm_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    with pytest.raises(SystemExit) as done:
        main(["serve", "--no-jobs", "--engine", "vllm", "--vllm-python", str(tmp_path / "nope")])
    assert done.value.code == 2
    err = capsys.readouterr().err
    assert "--vllm-python" in err and "not an executable python" in err and "Traceback" not in err
    with pytest.raises(SystemExit) as done:
        main(["serve", "--no-jobs", "--engine", "vllm", "--merge", "x", "--vllm-python", sys.executable])
    assert done.value.code == 2 and "--merge is for --engine tunelab" in capsys.readouterr().err
