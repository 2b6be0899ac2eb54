"""Tools and structured outputs with the official `openai` client against a live in-process server (uvicorn
in a thread) on the tiny Llama, its tokenizer given a Hermes-style tool template: a forced tool call and the
round trip back to an answer, json_schema output valid on 20 of 20 sampled prompts, constrained rows in a
batch with a plain row and an adapter row, streamed tool-call deltas, and 400s naming the parameter."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent))
from tool_templates import HERMES, LLAMA3_JSON, WEATHER_TOOL  # noqa: E402

from tunelab.data.templates import ToolFormat  # noqa: E402
from tunelab.server.tools import parse_tool_calls  # noqa: E402

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "temp", "unit"],
          "properties": {"city": {"type": "string", "maxLength": 10},
                         "temp": {"type": "integer", "minimum": -50, "maximum": 50},
                         "unit": {"enum": ["c", "f"]}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


def _engine(model_dir: Path, adapters: Path | None = None) -> Any:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tunelab.engine.engine import Engine

    tok = AutoTokenizer.from_pretrained(model_dir)
    return Engine(AutoModelForCausalLM.from_pretrained(model_dir), tok, base_name="tiny",
                  adapters_dir=adapters, batch_wait_s=0.05, max_model_len=2048)  # rope: no learned positions


@pytest.fixture(scope="module")
def served(lora_base_dir: Path, tiny_adapters: Path, tmp_path_factory: pytest.TempPathFactory,
           serve_live: Any) -> Iterator[Any]:
    from transformers import AutoTokenizer

    from tunelab.server import ServerSettings, create_app

    root = tmp_path_factory.mktemp("tools")
    model_dir = root / "base"
    shutil.copytree(lora_base_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.chat_template = HERMES
    tok.save_pretrained(model_dir)
    shutil.copytree(tiny_adapters / "alpha", root / "adapters" / "alpha")
    engine = _engine(model_dir, root / "adapters")
    try:
        with serve_live(create_app(engine, ServerSettings(max_tokens_limit=160))) as url:
            yield engine, openai.OpenAI(base_url=url, api_key="none", max_retries=0, timeout=120)
    finally:
        engine.close()


@pytest.fixture
def client(served: Any) -> openai.OpenAI:
    return served[1]


def test_tools_round_trip_forced_call_then_answer(client: openai.OpenAI) -> None:
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                           tool_choice=choice, temperature=0, max_tokens=120)  # type: ignore[arg-type]
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.content is None
        calls = c.message.tool_calls or []
        assert len(calls) == 1 and calls[0].id.startswith("call_") and calls[0].type == "function"
        assert calls[0].function.name == "get_weather"
        jsonschema.validate(json.loads(calls[0].function.arguments), WEATHER_TOOL["function"]["parameters"])
    # The client runs the tool and sends the result back: the template renders the call and the result.
    follow = [*ASK, c.message.model_dump(exclude_none=True),
              {"role": "tool", "tool_call_id": calls[0].id, "content": "18C and sunny"}]
    answer = client.chat.completions.create(model="tiny", messages=follow, tools=[WEATHER_TOOL],  # type: ignore[arg-type,list-item]
                                            tool_choice="none", temperature=0, max_tokens=8)
    assert answer.choices[0].message.tool_calls is None and isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage is not None and r.usage is not None and answer.usage.prompt_tokens > r.usage.prompt_tokens + 20


def test_json_schema_valid_on_20_of_20_sampled_prompts(client: openai.OpenAI) -> None:
    def ask(i: int) -> Any:
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"Weather report number {i}, as JSON."}],
            response_format=FORMAT, temperature=1.0, seed=i, max_tokens=120)  # type: ignore[arg-type]

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(ask, range(20)))
    texts = [o.choices[0].message.content for o in outs]
    for o, text in zip(outs, texts, strict=True):
        assert o.choices[0].finish_reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
    assert len(set(texts)) > 5  # sampled, not one memorised answer
    obj = client.chat.completions.create(model="tiny", messages=ASK, response_format={"type": "json_object"},
                                         temperature=0, max_tokens=150)
    if obj.choices[0].finish_reason == "stop":  # any object: a weak model may not close it within max_tokens
        assert isinstance(json.loads(obj.choices[0].message.content or ""), dict)


def test_json_schema_in_a_mixed_batch_with_plain_and_adapter_rows(served: Any) -> None:
    engine, client = served
    plain_kw: dict[str, Any] = {"model": "tiny", "messages": ASK, "temperature": 0, "max_tokens": 24}
    alone = client.chat.completions.create(**plain_kw).choices[0].message.content
    before = dict(engine.stats)
    jobs: list[dict[str, Any]] = [
        {**plain_kw},
        {"model": "tiny", "messages": ASK, "response_format": FORMAT, "temperature": 0, "max_tokens": 120},
        {"model": "alpha", "messages": ASK, "response_format": FORMAT, "temperature": 0, "max_tokens": 120},
        {"model": "alpha", "messages": ASK, "temperature": 0, "max_tokens": 24},
    ]
    with ThreadPoolExecutor(len(jobs)) as pool:
        outs = list(pool.map(lambda kw: client.chat.completions.create(**kw), jobs))
    assert engine.stats["peak_running"] >= 2 and engine.stats["rows"] - before["rows"] == 4
    assert outs[0].choices[0].message.content == alone  # a constrained neighbour leaves a free row alone
    for o in outs[1:3]:
        jsonschema.validate(json.loads(o.choices[0].message.content), SCHEMA)
    assert outs[1].choices[0].message.content != outs[2].choices[0].message.content  # the adapter ran


def test_streamed_tool_call_deltas(client: openai.OpenAI) -> None:
    chunks = list(client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                                 tool_choice="required", temperature=0, max_tokens=120,
                                                 stream=True))
    deltas = [tc for ch in chunks if ch.choices for tc in (ch.choices[0].delta.tool_calls or [])]
    assert deltas and deltas[0].id and deltas[0].function and deltas[0].function.name == "get_weather"
    args = "".join(d.function.arguments or "" for d in deltas if d.function)
    jsonschema.validate(json.loads(args), WEATHER_TOOL["function"]["parameters"])
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["tool_calls"]
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    whole = client.chat.completions.create(model="tiny", messages=ASK, tools=[WEATHER_TOOL],  # type: ignore[list-item]
                                           tool_choice="required", temperature=0, max_tokens=120)
    assert (whole.choices[0].message.tool_calls or [])[0].function.arguments == args


BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "objekt"}}}


@pytest.mark.parametrize(("kw", "param"), [
    ({"tools": [{"type": "retrieval"}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools[0].function.name"),
    ({"tools": [BAD_TOOL]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "yaml"}}, "response_format.type"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 3}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "strict": True,
                                                                  "schema": {"type": "object", "properties": {}}}}},
     "response_format.json_schema.schema"),
    ({"response_format": FORMAT, "tools": [WEATHER_TOOL], "tool_choice": "required"}, "response_format"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": "[1]"}}]}]},
     "messages[0].tool_calls[0].function.arguments"),
])
def test_bad_tools_and_formats_are_400_naming_the_parameter(client: openai.OpenAI, kw: dict[str, Any],
                                                            param: str) -> None:
    body: dict[str, Any] = {"model": "tiny", "messages": ASK, "max_tokens": 4, **kw}
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**body)
    assert e.value.status_code == 400 and e.value.param == param, e.value.body


def test_template_without_tools_is_400_naming_it(lora_base_dir: Path) -> None:
    from fastapi.testclient import TestClient

    from tunelab.server import ServerSettings, create_app

    engine = _engine(lora_base_dir)  # its ChatML template knows nothing of tools
    try:
        r = TestClient(create_app(engine, ServerSettings())).post("/v1/chat/completions", json={
            "model": "tiny", "messages": ASK, "tools": [WEATHER_TOOL], "max_tokens": 4})
    finally:
        engine.close()
    assert r.status_code == 400 and r.json()["error"]["param"] == "tools"
    assert "has no tool support" in r.json()["error"]["message"] and str(lora_base_dir) in r.json()["error"]["message"]


@pytest.mark.parametrize(("fmt", "text", "content", "calls"), [
    (ToolFormat("hermes"), 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n'
     '</tool_call>', "Let me look.", [("get_weather", {"city": "Rome"})]),
    (ToolFormat("hermes"), '<tool_call>{"name": "get_weather", "arguments": {"city": "A"}}</tool_call>\n<tool_call>'
     '{"name": "get_weather", "arguments": {"city": "B"}}</tool_call>', None,
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})]),
    (ToolFormat("hermes"), '<tool_call>{"name": "other", "arguments": {}}</tool_call>', "keep", []),
    (ToolFormat("json", "parameters"), '{"name": "get_weather", "parameters": {"city": "Oslo"}}', None,
     [("get_weather", {"city": "Oslo"})]),
    (ToolFormat("json", "parameters"), '<|python_tag|>{"name": "get_weather", "parameters": {"city": "A"}}; '
     '{"name": "get_weather", "parameters": {"city": "B"}}', None,
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})]),
    (ToolFormat("json", "parameters"), '{"answer": 42}', "keep", []),
    (ToolFormat("json", "parameters"), "It is sunny.", "keep", []),
])
def test_parsers_per_template_family(fmt: ToolFormat, text: str, content: str | None,
                                     calls: list[tuple[str, dict[str, Any]]]) -> None:
    got_content, got = parse_tool_calls(text, fmt, {"get_weather"})
    assert got_content == (text if content == "keep" else content)
    assert [(c.name, json.loads(c.arguments)) for c in got] == calls


def test_llama3_template_family_is_probed() -> None:
    import tiny

    from tunelab.data.templates import tool_format

    tok = tiny.tiny_tokenizer()
    tok.chat_template = LLAMA3_JSON
    assert tool_format(tok) == ToolFormat("json", "parameters")
