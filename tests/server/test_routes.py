"""Routes against the FakeEngine: schemas, errors and statuses, auth, limits, streaming format."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from fastapi import APIRouter, Depends
from fastapi.testclient import TestClient

from tunelab.errors import ConfigError
from tunelab.server import Principal, ServerSettings, authenticate, create_app, load_api_keys


@pytest.fixture
def engine() -> FakeEngine:
    return FakeEngine()


@pytest.fixture
def client(engine: FakeEngine) -> TestClient:
    return TestClient(create_app(engine, ServerSettings(max_tokens_limit=100, max_n=3, max_request_bytes=2000)))


def sse_events(text: str) -> list[str]:
    return [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]


def test_models_lists_base_and_adapters_with_parent(client: TestClient) -> None:
    r = client.get("/v1/models")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list"
    by_id = {m["id"]: m for m in body["data"]}
    assert set(by_id) == {"fake-base", "fake-a", "fake-b"}
    assert by_id["fake-base"]["parent"] is None
    assert by_id["fake-a"]["parent"] == "fake-base"
    for m in body["data"]:
        assert m["object"] == "model" and isinstance(m["created"], int) and m["owned_by"]
    assert client.get("/v1/models/fake-a").json()["id"] == "fake-a"
    assert client.get("/v1/models/nope").status_code == 404


def test_chat_completion_shape_usage_and_model_routing(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": "fake-a", "messages": [{"role": "developer", "content": "be brief"},
                                        {"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
        "max_completion_tokens": 50, "temperature": 0,
    })
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion" and body["model"] == "fake-a"
    choice = body["choices"][0]
    assert choice["message"] == {"role": "assistant", "content": " echo from fake-a: be brief hi there"}
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 7, "total_tokens": 11}
    sent = engine.requests[-1]
    assert sent.model == "fake-a" and sent.sampling.temperature == 0 and sent.sampling.max_tokens == 50
    assert sent.messages is not None and sent.messages[0]["role"] == "system"  # developer -> system


def test_length_finish_and_n_choices(client: TestClient, engine: FakeEngine) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": "fake-base", "messages": [{"role": "user", "content": "a b c"}], "max_tokens": 2, "n": 3,
        "seed": 7,
    })
    body = r.json()
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    assert all(c["finish_reason"] == "length" and c["message"]["content"] == " echo from" for c in body["choices"])
    assert body["usage"]["completion_tokens"] == 6 and body["usage"]["prompt_tokens"] == 3
    assert sorted(r.sampling.seed for r in engine.requests[-3:]) == [7, 8, 9]  # type: ignore[type-var]


def test_stop_string_cuts_output(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake-b", "prompt": "one two three", "stop": [" two"]})
    choice = r.json()["choices"][0]
    assert choice["text"] == " echo from fake-b: one" and choice["finish_reason"] == "stop"


def test_completions_multiple_prompts_index_order(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake-a", "prompt": ["x", "y"], "n": 2, "max_tokens": 5})
    body = r.json()
    assert body["object"] == "text_completion"
    texts = [c["text"] for c in sorted(body["choices"], key=lambda c: c["index"])]
    assert texts == [" echo from fake-a: x"] * 2 + [" echo from fake-a: y"] * 2
    assert body["usage"]["prompt_tokens"] == 2
    r = client.post("/v1/completions", json={"model": "fake-a", "prompt": [5, 6, 7], "max_tokens": 20})
    assert r.json()["choices"][0]["text"] == " echo from fake-a: t5 t6 t7"


def test_chat_stream_chunks_done_and_usage(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": "fake-a", "messages": [{"role": "user", "content": "hey"}], "stream": True,
        "stream_options": {"include_usage": True},
    })
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text == " echo from fake-a: hey"
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == {"prompt_tokens": 1, "completion_tokens": 4,
                                                                    "total_tokens": 5}


def test_completion_stream_without_usage(client: TestClient) -> None:
    r = client.post("/v1/completions", json={"model": "fake-b", "prompt": "p", "stream": True, "max_tokens": 2})
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == " echo from"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": [{"role": "user", "content": "x"}], "temperature": 3}, "temperature"),
        ({"messages": [{"role": "user", "content": "x"}], "top_p": 0}, "top_p"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 101}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 4}, "n"),
        ({"messages": [{"role": "user", "content": "x"}], "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools[0].function"),
        ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
         "messages.0.content"),
    ],
)
def test_bad_parameters_are_400_with_param(client: TestClient, body: dict, param: str) -> None:
    r = client.post("/v1/chat/completions", json={"model": "fake-a", **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param and err["message"]


def test_invalid_json_is_400(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]


def test_unknown_model_is_404_model_not_found(client: TestClient) -> None:
    for path, extra in [("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}),
                        ("/v1/completions", {"prompt": "x"})]:
        r = client.post(path, json={"model": "nope", **extra})
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found" and r.json()["error"]["param"] == "model"


def test_prompt_beyond_context_is_400(engine: FakeEngine) -> None:
    client = TestClient(create_app(FakeEngine(max_model_len=10), ServerSettings()))
    r = client.post("/v1/completions", json={"model": "fake-a", "prompt": "a b c d e", "max_tokens": 6})
    assert r.status_code == 400 and r.json()["error"]["param"] == "max_tokens"
    # Without max_tokens the default shrinks to the room left in the context instead of failing.
    r = client.post("/v1/completions", json={"model": "fake-a", "prompt": "a b c d e"})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5


def test_unknown_route_is_openai_error(client: TestClient) -> None:
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and "error" in r.json()


def test_request_size_limit_413(client: TestClient) -> None:
    big = {"model": "fake-a", "messages": [{"role": "user", "content": "x" * 5000}]}
    r = client.post("/v1/chat/completions", json=big)
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"

    def chunks():  # no Content-Length: counted while reading
        yield json.dumps(big).encode()

    r = client.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_health(client: TestClient, engine: FakeEngine) -> None:
    r = client.get("/health")
    assert r.status_code == 200 and r.json() == {"status": "ok"}  # no details without an admin key
    admin = TestClient(create_app(engine, ServerSettings(api_keys={"sk-adm": "admin", "sk-u": "u"},
                                                         admin_keys=frozenset({"sk-adm"}))))
    assert admin.get("/health", headers={"Authorization": "Bearer sk-u"}).json() == {"status": "ok"}
    r = admin.get("/health", headers={"Authorization": "Bearer sk-adm"})
    assert r.json()["model"] == "fake-base" and "engine" in r.json()


def test_api_keys_guard_every_route_and_name_the_owner(engine: FakeEngine) -> None:
    who = APIRouter()

    @who.get("/v1/whoami")
    async def whoami(principal: Principal = Depends(authenticate)) -> dict:
        return {"owner": principal.owner}

    app = create_app(engine, ServerSettings(api_keys={"sk-good": "alice", "sk-two": "bob"}), extra_routers=[who])
    client = TestClient(app)
    for method, path in [("GET", "/v1/models"), ("GET", "/health"), ("POST", "/v1/completions"),
                         ("POST", "/v1/chat/completions"), ("GET", "/v1/whoami")]:
        r = client.request(method, path, json={"model": "fake-a", "prompt": "x"})
        assert r.status_code == 401, path
        assert r.json()["error"]["code"] == "invalid_api_key"
        r = client.request(method, path, headers={"Authorization": "Bearer sk-bad"})
        assert r.status_code == 401, path
    ok = {"Authorization": "Bearer sk-good"}
    assert client.get("/v1/models", headers=ok).status_code == 200
    assert client.get("/v1/whoami", headers=ok).json() == {"owner": "alice"}
    assert client.get("/v1/whoami", headers={"Authorization": "Bearer sk-two"}).json() == {"owner": "bob"}
    assert client.get("/openapi.json").status_code in (401, 404)  # the schema is not served unauthenticated
    assert TestClient(create_app(engine)).get("/v1/whoami").status_code == 404  # extra routers only when given


def test_register_adapter_on_running_app(engine: FakeEngine, tmp_path: Path) -> None:
    client = TestClient(create_app(engine))
    (tmp_path / "adapter_config.json").write_text("{}")
    engine.register_adapter("new-one", tmp_path, owned_by="alice")
    card = client.get("/v1/models/new-one").json()
    assert card["owned_by"] == "alice" and card["parent"] == "fake-base"
    r = client.post("/v1/completions", json={"model": "new-one", "prompt": "x"})
    assert r.status_code == 200


def test_load_api_keys_file(tmp_path: Path) -> None:
    f = tmp_path / "keys.txt"
    f.write_text("# team keys\nsk-1 alice\n\nsk-2\n")
    keys = load_api_keys(["sk-cli"], f)
    assert keys["sk-1"] == "alice" and keys["sk-2"].startswith("key-") and "sk-cli" in keys
    f.write_text("sk-1 alice extra\n")
    with pytest.raises(ConfigError, match=r"keys.txt:1"):
        load_api_keys([], f)
    with pytest.raises(ConfigError, match="cannot read"):
        load_api_keys([], tmp_path / "missing.txt")


def test_stream_with_n_choices_keeps_each_choice_apart(client: TestClient) -> None:
    r = client.post("/v1/chat/completions", json={
        "model": "fake-b", "messages": [{"role": "user", "content": "x y"}], "stream": True, "n": 2, "max_tokens": 4,
    })
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    for index in (0, 1):
        mine = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        assert mine[0]["delta"] == {"role": "assistant", "content": ""}
        assert "".join(c["delta"].get("content") or "" for c in mine) == " echo from fake-b: x"
        assert [c["finish_reason"] for c in mine if c["finish_reason"]] == ["length"]
