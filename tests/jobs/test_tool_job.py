"""A tool-calling fine-tune end to end through the jobs API: an OpenAI function-calling training file (tools,
assistant tool_calls with null content, tool results) uploaded with the `openai` client, trained on a tiny
Llama whose template renders tools (Hermes style), then the fine-tuned model served with tools."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from livejobs import ALICE, BOB, Server, start_server, wait_status
from tiny import save_tiny, write_jsonl

sys.path.insert(0, str(Path(__file__).parent.parent))
from tool_templates import HERMES  # noqa: E402

ADD = {"type": "function", "function": {"name": "add", "description": "Add two integers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "maximum": 99, "minimum": 0},
                                     "b": {"type": "integer", "maximum": 99, "minimum": 0}},
    "required": ["a", "b"], "additionalProperties": False}}}


def rows(n: int) -> list[dict[str, Any]]:
    out = []
    for i in range(n):
        a, b = i, 2 * i + 1
        out.append({"tools": [ADD], "messages": [
            {"role": "user", "content": f"add {a} and {b}"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": f"call_{i}", "type": "function", "function": {"name": "add",
                                                                     "arguments": json.dumps({"a": a, "b": b})}}]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": str(a + b)},
            {"role": "assistant", "content": f"{a + b}"}]})
    return out


@pytest.fixture(scope="module")
def tool_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Path]]:
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("tooljob")
    model = save_tiny(root / "tiny", max_position_embeddings=1024)  # room for the rendered tools
    tok = AutoTokenizer.from_pretrained(model)
    tok.chat_template = HERMES
    tok.save_pretrained(model)
    keys = root / "keys.txt"
    keys.write_text(f"{ALICE} alice\n{BOB} bob\n")
    write_jsonl(root / "tools.jsonl", rows(12))
    srv = start_server(model, root / "data", keys, "--workers", "1")
    yield srv, root
    srv.stop()


def test_tool_calling_fine_tune_job_end_to_end(tool_server: tuple[Server, Path]) -> None:
    srv, root = tool_server
    client = srv.client()
    with open(root / "tools.jsonl", "rb") as f:
        train = client.files.create(file=f, purpose="fine-tune")
    job = client.fine_tuning.jobs.create(training_file=train.id, model="tiny-llama", suffix="tools")
    job = wait_status(client, job.id, timeout=300)
    assert job.status == "succeeded", job.error
    assert job.trained_tokens and job.trained_tokens > 0
    ask = [{"role": "user", "content": "add 5 and 11"}]
    r = client.chat.completions.create(model=job.fine_tuned_model or "", messages=ask, tools=[ADD],  # type: ignore[arg-type,list-item]
                                       tool_choice="required", temperature=0, max_tokens=100)
    call = (r.choices[0].message.tool_calls or [None])[0]
    assert call is not None and call.function.name == "add" and r.choices[0].finish_reason == "tool_calls"
    assert set(json.loads(call.function.arguments)) == {"a", "b"}


def test_tool_file_with_a_bad_call_fails_validation_naming_line_and_field(tool_server: tuple[Server, Path]) -> None:
    srv, root = tool_server
    client = srv.client()
    bad = rows(12)
    bad[4]["messages"][2]["tool_call_id"] = "call_99"
    write_jsonl(root / "bad_tools.jsonl", bad)
    with open(root / "bad_tools.jsonl", "rb") as f:
        train = client.files.create(file=f, purpose="fine-tune")
    job = wait_status(client, client.fine_tuning.jobs.create(training_file=train.id, model="tiny-llama").id)
    assert job.status == "failed" and job.error is not None
    assert "line 5" in (job.error.message or "") and "tool_call_id" in (job.error.message or ""), job.error
