"""Serving registry versions by name: a live in-process server (uvicorn in a thread) on the tiny model with the
official `openai` client. NAME, NAME@V, NAME@ALIAS, the x-tunelab-model-version header on whole and streamed
responses, alias moves made by another Registry instance applied on the next request, sticky A/B splits, 404s
(unknown version/alias, another owner's name, internal names), /metrics in Prometheus format."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

sys.path.insert(0, str(Path(__file__).parent.parent / "engine"))
sys.path.insert(0, str(Path(__file__).parent.parent / "security"))

from lora_fixtures import make_adapter, make_tiny_model_dir  # noqa: E402
from sechelp import InProcess  # noqa: E402

from tunelab.registry import Registry  # noqa: E402
from tunelab.server.routing import HEADER  # noqa: E402

ALICE, BOB, ADMIN = "sk-alice", "sk-bob", "sk-admin"
HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    from tunelab.engine.engine import Engine
    from tunelab.server import ServerSettings, create_app

    root = tmp_path_factory.mktemp("serve-registry")
    base = make_tiny_model_dir(root / "base")
    adapters = [make_adapter(base, root / f"a{i}", seed=i) for i in (1, 2, 3)]
    reg = Registry.open(root / "data")
    for a in adapters:
        reg.add("notes", a, owner="alice")
    reg.promote("notes", 1, owner="alice")
    reg.alias("notes", "staging", 2, owner="alice")
    reg.add("secret", adapters[2], owner="bob")
    reg.promote("secret", 1, owner="bob")
    reg.add("whole", base, owner="alice")  # a full model folder: not servable on the one base
    reg.add("mine", adapters[0])  # the CLI's owner, `local`: served when the server has no keys
    reg.promote("mine", 1)

    engine = Engine.from_pretrained(str(base), dtype="fp32", served_model_name="tiny",
                                    adapters={"plain-two": adapters[1]})
    keyed = ServerSettings(api_keys={ALICE: "alice", BOB: "bob", ADMIN: "admin"}, admin_keys=frozenset({ADMIN}))
    servers = [InProcess(create_app(engine, keyed, registry=reg)), InProcess(create_app(engine, registry=reg))]
    yield {"root": root, "reg": reg, "engine": engine, "live": servers[0].live, "open": servers[1].live}
    for s in servers:
        s.stop()
    engine.close()
    reg.close()


def _client(env: dict[str, Any], key: str = ALICE) -> openai.OpenAI:
    return env["live"].client(key)


def _chat(client: openai.OpenAI, model: str, user: str | None = None, max_tokens: int = 8) -> tuple[str, str, str]:
    """(header, body model, text) of a greedy chat completion."""
    extra = {"user": user} if user else {}
    raw = client.chat.completions.with_raw_response.create(model=model, messages=HELLO, max_tokens=max_tokens,
                                                           temperature=0, **extra)
    body = raw.parse()
    return raw.headers[HEADER], body.model, body.choices[0].message.content or ""


def test_name_version_and_alias_resolve_to_that_versions_weights(env: dict[str, Any]) -> None:
    client = _client(env)
    assert _chat(client, "notes")[:2] == ("notes@1", "notes@1")  # NAME is its production alias
    header, model, text_two = _chat(client, "notes@2")
    assert (header, model) == ("notes@2", "notes@2")
    assert _chat(client, "notes@staging") == ("notes@2", "notes@2", text_two)
    # The same weights served as a plain adapter give the same greedy text; another version does not.
    assert _chat(client, "plain-two") == ("plain-two", "plain-two", text_two)
    assert _chat(client, "notes@1")[2] != text_two
    assert _chat(client, "tiny")[0] == "tiny"  # the base says its own name


def test_header_on_streams_and_completions(env: dict[str, Any]) -> None:
    client = _client(env)
    with client.chat.completions.with_streaming_response.create(
            model="notes@staging", messages=HELLO, max_tokens=4, stream=True) as resp:
        assert resp.headers[HEADER] == "notes@2"
        assert "[DONE]" in "".join(resp.iter_lines())
    raw = client.completions.with_raw_response.create(model="notes", prompt="once upon", max_tokens=4)
    assert raw.headers[HEADER] == "notes@1" and raw.parse().model == "notes@1"
    with client.completions.with_streaming_response.create(model="notes@3", prompt="a", max_tokens=3,
                                                           stream=True) as resp:
        assert resp.headers[HEADER] == "notes@3"
        list(resp.iter_lines())


def test_alias_moved_by_another_process_applies_to_the_next_request(env: dict[str, Any]) -> None:
    client = _client(env)
    engine = env["engine"]
    loads = engine.stats["adapter_loads"]
    other = Registry.open(env["root"] / "data")  # what `tunelab registry promote` does in its own process
    try:
        other.promote("notes", 3, owner="alice")
        assert _chat(client, "notes")[0] == "notes@3"
        other.rollback("notes", owner="alice")
        assert _chat(client, "notes")[0] == "notes@1"
    finally:
        other.close()
    # The CLI, as an operator would run it for a key's owner (its own Registry instance).
    from tunelab.cli import main

    with pytest.raises(SystemExit) as done:
        main(["registry", "promote", "notes", "2", "--owner", "alice", "--data-dir", str(env["root"] / "data")])
    assert done.value.code == 0
    assert _chat(client, "notes")[0] == "notes@2"
    env["reg"].promote("notes", 1, owner="alice")
    # Versions stay registered: moving the alias back and forth loaded each adapter at most once more (the
    # base is never reloaded: the engine holds one base model throughout).
    assert engine.stats["adapter_loads"] - loads <= 3
    assert sum(1 for m in engine.list_models() if m.id.startswith("registry:alice/notes@1#")) == 1


def test_split_is_sticky_per_user(env: dict[str, Any]) -> None:
    client = _client(env)
    env["reg"].route("notes", "canary", {1: 0.5, 3: 0.5}, owner="alice")
    seen: dict[str, str] = {}
    for i in range(12):  # the pick is a hash of the user: deterministic, so these 12 users always split both ways
        user = f"user-{i}"
        first = _chat(client, "notes@canary", user=user, max_tokens=1)[0]
        assert _chat(client, "notes@canary", user=user, max_tokens=1)[0] == first  # a user stays on one side
        seen[user] = first
    assert set(seen.values()) == {"notes@1", "notes@3"}


def test_unknown_and_other_owners_names_are_404_on_model(env: dict[str, Any]) -> None:
    client = _client(env)
    _chat(client, "notes")
    internal = next(m.id for m in env["engine"].list_models() if m.id.startswith("registry:"))
    for model in ("notes@9", "notes@nosuchalias", "secret", "secret@1", "nope", internal):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
        body = e.value.body
        assert isinstance(body, dict) and body["code"] == "model_not_found" and body["param"] == "model", model
    bob = _client(env, BOB)
    assert _chat(bob, "secret")[0] == "secret@1"
    with pytest.raises(openai.NotFoundError):
        bob.chat.completions.create(model="notes", messages=HELLO, max_tokens=2)


def test_refusals_after_resolution_name_the_version(env: dict[str, Any]) -> None:
    with env["live"].http(ALICE) as http:
        r = http.post("/v1/chat/completions", json={"model": "notes", "messages": HELLO, "max_tokens": 10**6})
        assert r.status_code == 400 and r.headers[HEADER] == "notes@1" and r.json()["error"]["param"] == "max_tokens"
        r = http.post("/v1/chat/completions", json={"model": "whole@1", "messages": HELLO})
        assert r.status_code == 400 and r.json()["error"]["code"] == "model_not_servable"


def test_models_lists_the_owners_names_and_aliases_only(env: dict[str, Any]) -> None:
    ids = {m.id for m in _client(env).models.list()}
    assert {"tiny", "plain-two", "notes", "notes@production", "notes@staging", "notes@1", "notes@3"} <= ids
    assert not any(i.startswith(("registry:", "secret", "mine", "whole")) for i in ids)
    assert _client(env).models.retrieve("notes@staging").owned_by == "alice"
    assert "secret" in {m.id for m in _client(env, BOB).models.list()}


def test_without_keys_the_local_registry_is_served(env: dict[str, Any]) -> None:
    client = env["open"].client("unused")
    assert _chat(client, "mine")[0] == "mine@1"
    assert "mine" in {m.id for m in client.models.list()} and "notes" not in {m.id for m in client.models.list()}
    with httpx.Client(base_url=env["open"].root) as http:  # no keys: /metrics is open
        assert http.get("/metrics").status_code == 200


def test_metrics_count_requests_tokens_and_latency_per_version(env: dict[str, Any]) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    live = env["live"]

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        with live.http(ADMIN) as http:
            r = http.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for fam in text_string_to_metric_families(r.text) for s in fam.samples}

    def requests(m: dict[Any, float], version: str, status: str) -> float:
        return m.get(("tunelab_requests_total", (("endpoint", "chat"), ("model_version", version),
                                                 ("status", status))), 0.0)

    before = scrape()
    client = _client(env)
    for _ in range(3):
        _chat(client, "notes@staging")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="notes@9", messages=HELLO, max_tokens=2)
    after = scrape()
    assert requests(after, "notes@2", "200") - requests(before, "notes@2", "200") == 3
    assert requests(after, "unknown", "404") - requests(before, "unknown", "404") == 1
    tokens = ("tunelab_completion_tokens_total", (("model_version", "notes@2"),))
    assert 0 < after[tokens] - before.get(tokens, 0.0) <= 3 * 8
    count = ("tunelab_request_duration_seconds_count", (("endpoint", "chat"), ("model_version", "notes@2")))
    assert after[count] - before.get(count, 0.0) == 3
    with live.http(ALICE) as http:  # keys configured: admin only
        assert http.get("/metrics").status_code == 403
