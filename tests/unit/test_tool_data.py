"""Tool-calling training data (OpenAI's chat format with tools): reading, the line-and-field errors, rendering
with the template's own tool support, label masks over assistant calls and text only, the template error."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import tiny
from tool_templates import HERMES, LLAMA3_JSON, WEATHER_TOOL

from tunelab.data.readers import parse_file
from tunelab.data.records import Conversation, Preference
from tunelab.data.templates import IGNORE_INDEX, ToolFormat, encode, encode_prompt, tool_format
from tunelab.data.validate import validate_file
from tunelab.errors import TunelabError


def call(cid: str, name: str = "get_weather", args: Any = None) -> dict[str, Any]:
    arguments = json.dumps({"city": "Paris"}) if args is None else args
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": arguments}}


ROW: dict[str, Any] = {
    "tools": [WEATHER_TOOL],
    "parallel_tool_calls": True,
    "messages": [
        {"role": "system", "content": "You help with weather."},
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {"role": "assistant", "content": None, "tool_calls": [call("c1"), call("c2", args='{"city": "Rome"}')]},
        {"role": "tool", "tool_call_id": "c1", "content": "PARIS-18C"},
        {"role": "tool", "tool_call_id": "c2", "content": "ROME-25C"},
        {"role": "assistant", "content": "Paris 18C, Rome 25C."},
    ],
}


def tok_with(template: str | None) -> Any:
    tok = tiny.tiny_tokenizer()
    if template is not None:
        tok.chat_template = template
    return tok


def write(tmp_path: Path, rows: list[dict[str, Any]]) -> Path:
    return tiny.write_jsonl(tmp_path / "tools.jsonl", rows)


def errors(path: Path, **kw: Any) -> list[tuple[int | None, str | None, str]]:
    return [(i.line, i.field, i.message) for i in validate_file(path, min_examples=1, **kw).errors]


def test_openai_tool_file_reads_into_records(tmp_path: Path) -> None:
    res = parse_file(write(tmp_path, [ROW]))
    assert res.errors == []
    conv = res.records[0]
    assert isinstance(conv, Conversation) and conv.tools == (WEATHER_TOOL,)
    calls = conv.messages[2].tool_calls
    assert [(c.id, c.name, json.loads(c.arguments)) for c in calls] == [
        ("c1", "get_weather", {"city": "Paris"}), ("c2", "get_weather", {"city": "Rome"})]
    assert conv.messages[2].content == "" and conv.messages[3].tool_call_id == "c1"
    again = conv.to_json()  # written back as OpenAI's shape: null content, tool_calls, tool_call_id
    assert again["messages"][2]["content"] is None and again["messages"][2]["tool_calls"][0] == call("c1")
    assert again["tools"] == [WEATHER_TOOL]


def test_legacy_functions_become_tools(tmp_path: Path) -> None:
    row = {"functions": [WEATHER_TOOL["function"]], "messages": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": None, "function_call": {"name": "get_weather", "arguments": '{"city": "P"}'}},
        {"role": "function", "name": "get_weather", "content": "18C"},
        {"role": "assistant", "content": "18C."}]}
    res = parse_file(write(tmp_path, [row]))
    assert res.errors == []
    conv = res.records[0]
    assert isinstance(conv, Conversation) and conv.tools[0]["function"]["name"] == "get_weather"
    assert conv.messages[2].role == "tool" and conv.messages[2].tool_call_id == conv.messages[1].tool_calls[0].id


def mutate(fn: Any) -> dict[str, Any]:
    row = copy.deepcopy(ROW)
    fn(row)
    return row


@pytest.mark.parametrize(("row", "field", "words"), [
    (mutate(lambda r: r["messages"][3].update(tool_call_id="c9")), "messages[3].tool_call_id", "answers no earlier call"),
    (mutate(lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments='["Paris"]')),
     "messages[2].tool_calls[0].function.arguments", "must be a JSON object"),
    (mutate(lambda r: r["messages"][2]["tool_calls"][0]["function"].update(arguments="{city: Paris")),
     "messages[2].tool_calls[0].function.arguments", "not valid JSON"),
    (mutate(lambda r: r["messages"][2]["tool_calls"][1]["function"].update(name="get_time")),
     "messages[2].tool_calls[1].function.name", "'get_time', which is not declared in tools"),
    (mutate(lambda r: r["messages"].insert(1, {"role": "tool", "tool_call_id": "c1", "content": "x"})),
     "messages[1].role", "before any assistant tool call"),
    (mutate(lambda r: r.update(parallel_tool_calls=False)), "messages[2].tool_calls", "parallel_tool_calls: false"),
    (mutate(lambda r: r.pop("tools")), "messages[2].tool_calls[0].function.name", "the line has no 'tools'"),
    (mutate(lambda r: r["tools"][0]["function"].update(parameters={"type": "objekt"})),
     "tools[0].function.parameters", "not a valid JSON Schema"),
    (mutate(lambda r: r["messages"][3].pop("tool_call_id")), "messages[3].tool_call_id", "needs the 'tool_call_id'"),
    (mutate(lambda r: (r["messages"][2]["tool_calls"][1].update(id="c1"), r["messages"][4].update(tool_call_id="c1"))), "messages[2].tool_calls[1].id", "used twice"),
])
def test_tool_errors_name_line_and_field(tmp_path: Path, row: dict[str, Any], field: str, words: str) -> None:
    rows = [tiny.chat_rows(1)[0], row]
    got = errors(write(tmp_path, rows))
    assert [(ln, f) for ln, f, _ in got] == [(2, field)], got
    assert words in got[0][2]


def test_prompt_completion_with_tools_is_refused(tmp_path: Path) -> None:
    got = errors(write(tmp_path, [{"prompt": "p", "completion": "c", "tools": [WEATHER_TOOL]}]))
    assert got[0][:2] == (1, "tools") and "chat (messages) or preference" in got[0][2]


def test_preference_with_tools_and_openai_dpo_shape(tmp_path: Path) -> None:
    row = {"tools": [WEATHER_TOOL], "prompt": [{"role": "user", "content": "Paris?"}],
           "chosen": [{"role": "assistant", "content": None, "tool_calls": [call("c1")]}],
           "rejected": [{"role": "assistant", "content": "I cannot know."}]}
    res = parse_file(write(tmp_path, [row]))
    assert res.errors == []
    pref = res.records[0]
    assert isinstance(pref, Preference) and pref.tools == (WEATHER_TOOL,)
    chosen, rejected = pref.as_conversations()
    assert chosen.tools == (WEATHER_TOOL,) and chosen.messages[-1].tool_calls[0].name == "get_weather"
    bad = {**row, "chosen": [{"role": "assistant", "content": None, "tool_calls": [call("c1", name="nope")]}]}
    got = errors(write(tmp_path, [bad]))
    assert got[0][:2] == (1, "chosen[0].tool_calls[0].function.name")


@pytest.mark.parametrize(("template", "fmt", "call_text"), [
    (HERMES, ToolFormat("hermes"), '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    (LLAMA3_JSON, ToolFormat("json", "parameters"), '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
])
def test_mask_trains_calls_and_text_not_tool_results(tmp_path: Path, template: str, fmt: ToolFormat,
                                                     call_text: str) -> None:
    tok = tok_with(template)
    assert tool_format(tok) == fmt
    conv = parse_file(write(tmp_path, [ROW])).records[0]
    assert isinstance(conv, Conversation)
    enc = encode(tok, conv)
    full = tok.decode(enc.input_ids)
    trained = tok.decode([t for t, lab in zip(enc.input_ids, enc.labels, strict=True) if lab != IGNORE_INDEX])
    assert "Current weather in a city" in full  # the template rendered the tool definitions
    assert call_text in trained and "Paris 18C, Rome 25C." in trained
    assert "PARIS-18C" in full and "PARIS-18C" not in trained and "ROME-25C" not in trained
    assert "Weather in Paris and Rome?" not in trained and "Current weather" not in trained
    # The prompt for generation renders the same tools.
    prompt = tok.decode(encode_prompt(tok, list(conv.messages[:2]), tools=conv.tools))
    assert full.startswith(prompt)


def test_template_without_tools_is_an_error_naming_it(tmp_path: Path) -> None:
    tok = tok_with(None)  # ChatML without tools, like SmolLM2-135M-Instruct's own template
    tok.name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    conv = parse_file(write(tmp_path, [ROW])).records[0]
    assert isinstance(conv, Conversation)
    with pytest.raises(TunelabError, match=r"chat template of 'HuggingFaceTB/SmolLM2-135M-Instruct' has no tool "
                                           r"support: it ignores tool definitions"):
        encode(tok, conv)
    got = errors(write(tmp_path, [tiny.chat_rows(1)[0], ROW]), tokenizer=tok)
    assert len(got) == 1 and got[0][:2] == (2, "tools") and "SmolLM2-135M-Instruct" in got[0][2]
    plain = encode(tok, Conversation(conv.messages[:2] + conv.messages[-1:]))  # no tools: renders as before
    assert plain.num_trained > 0


def test_token_checks_with_a_tool_template(tmp_path: Path) -> None:
    rep = validate_file(write(tmp_path, [ROW] * 2), tokenizer=tok_with(HERMES), min_examples=1)
    assert rep.errors == [] and rep.trained_tokens > 0 and rep.duplicates == 1
