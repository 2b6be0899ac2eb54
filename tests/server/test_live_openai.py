"""The official `openai` client against a live `tunelab serve` (a subprocess) on a tiny model with two
adapters and a broken adapter folder: models, chat per model, streaming, errors, auth, clean SIGTERM stop."""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from livejobs import serve_process

KEY = "sk-test-123"


class Server:
    def __init__(self, proc: subprocess.Popen[str], url: str, lines: list[str], reader: threading.Thread) -> None:
        self.proc, self.url, self.lines, self.reader = proc, url, lines, reader


def start_serve(args: list[str], timeout: float = 120) -> Server:
    return Server(*serve_process(["--port", "0", "--no-jobs", *args], timeout))


def stop(server: Server) -> int:
    if server.proc.poll() is None:
        server.proc.send_signal(signal.SIGTERM)
    code = server.proc.wait(timeout=60)
    server.reader.join(10)  # every line the server printed has been read
    return code


@pytest.fixture(scope="module")
def live(lora_base_dir: Path, tiny_adapters: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("runs")
    shutil.copytree(tiny_adapters / "alpha", root / "alpha")
    shutil.copytree(tiny_adapters / "beta", root / "beta")
    (root / "broken").mkdir()
    (root / "broken" / "adapter_config.json").write_text('{"peft_type": "LORA"}')  # weights missing
    server = start_serve(["--model", str(lora_base_dir), "--served-model-name", "tiny", "--dtype", "fp32",
                          "--adapters-dir", str(root), "--api-key", KEY, "--max-tokens-limit", "64"])
    yield server
    assert stop(server) == 0  # SIGTERM: a clean stop, engine closed
    assert server.lines[-1] == "server stopped"


@pytest.fixture
def client(live: Server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live.url, api_key=KEY, max_retries=0, timeout=60)


def test_startup_prints_url_models_and_skipped_folder(live: Server) -> None:
    text = "\n".join(live.lines)
    assert "models: tiny, alpha, beta" in text
    assert re.search(r"skipped .*broken: .*weights are missing", text)


def test_list_models(client: openai.OpenAI) -> None:
    models = {m.id: m for m in client.models.list()}
    assert set(models) == {"tiny", "alpha", "beta"}
    assert getattr(models["alpha"], "parent", None) == "tiny"


def test_chat_with_each_model_outputs_differ(client: openai.OpenAI) -> None:
    outs = {}
    for model in ("tiny", "alpha", "beta"):
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hello"}],
                                           temperature=0, max_tokens=12)
        assert r.model == model and r.choices[0].finish_reason in ("stop", "length")
        assert r.usage is not None and r.usage.prompt_tokens > 0
        assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
        outs[model] = r.choices[0].message.content
    assert len(set(outs.values())) == 3


def test_stream_matches_whole_response(client: openai.OpenAI) -> None:
    kw = {"model": "beta", "messages": [{"role": "user", "content": "stream me"}], "temperature": 0, "max_tokens": 10}
    whole = client.chat.completions.create(**kw)  # type: ignore[call-overload]
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        whole.choices[0].finish_reason]


def test_text_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(model="alpha", prompt="once upon", max_tokens=5, temperature=0, n=2)
    assert len(r.choices) == 2 and r.choices[0].text == r.choices[1].text  # greedy: both choices agree
    assert r.usage is not None and r.usage.completion_tokens == 10


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and "nope" in str(err.value)
    with pytest.raises(openai.NotFoundError):  # the broken folder is not served
        client.chat.completions.create(model="broken", messages=[{"role": "user", "content": "x"}])


def test_bad_key_is_401_and_bad_params_400(live: Server, client: openai.OpenAI) -> None:
    bad = openai.OpenAI(base_url=live.url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.chat.completions.create(model="alpha", messages=[{"role": "user", "content": "x"}], max_tokens=65)
