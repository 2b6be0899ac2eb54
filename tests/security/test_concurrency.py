"""32 clients of two owners at once against the live server: alice's 16 send good requests, bob's 16 send every
kind of bad request the hardening items list. No good request may fail; every bad one is answered 4xx (with a
`code`) within its timeout. Every loop is bounded; all traffic goes to 127.0.0.1."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx
from sechelp import ALICE, BASE, BOB, MAX_UPLOAD, Live, chunked, deep_json, multipart

TIMEOUT = 120.0
USER = [{"role": "user", "content": "hi"}]


def _bad_requests(bob_file: str, alice_file: str) -> list[tuple[str, Callable[[httpx.Client], httpx.Response]]]:
    big, ctype = multipart(b'{"a": 1}\n' * ((MAX_UPLOAD + 65536) // 9 + 1000))
    deep, deep_type = multipart((deep_json(60_000) + "\n").encode())
    empty, empty_type = multipart(b"")
    job = {"model": BASE, "training_file": bob_file}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}

    def chat(**extra: Any) -> Callable[[httpx.Client], httpx.Response]:
        return lambda h: h.post("/v1/chat/completions", json={"model": BASE, "messages": USER, "max_tokens": 4, **extra})

    def create(**extra: Any) -> Callable[[httpx.Client], httpx.Response]:
        return lambda h: h.post("/v1/fine_tuning/jobs", json={**job, **extra})

    return [
        ("huge seed", chat(seed=2**64, temperature=1.0)),
        ("negative seed", chat(seed=-1, temperature=1.0)),
        ("stream 'yes'", chat(stream="yes")),
        ("tools", chat(tools=[tool])),
        ("tool_choice", chat(tool_choice="auto")),
        ("deep request body", lambda h: h.post("/v1/chat/completions", content=deep_json(60_000),
                                               headers={"content-type": "application/json"})),
        ("deep JSONL upload", lambda h: h.post("/v1/files", content=deep, headers={"content-type": deep_type})),
        ("oversized upload", lambda h: h.post("/v1/files", content=big, headers={"content-type": ctype})),
        ("oversized chunked upload", lambda h: h.post("/v1/files", content=chunked(big),
                                                      headers={"content-type": ctype})),
        ("empty fine-tune upload", lambda h: h.post("/v1/files", content=empty, headers={"content-type": empty_type})),
        ("lr multiplier 1e9", create(hyperparameters={"learning_rate_multiplier": 1e9})),
        ("lr multiplier Infinity", lambda h: h.post(
            "/v1/fine_tuning/jobs", headers={"content-type": "application/json"},
            content=json.dumps(job)[:-1] + ', "hyperparameters": {"learning_rate_multiplier": Infinity}}')),
        ("n_epochs true", create(hyperparameters={"n_epochs": True})),
        ("bad suffix", create(suffix="../x")),
        ("unknown target module", create(tunelab={"target_modules": ["nope_proj"]})),
        ("training on another owner's file", create(training_file=alice_file)),
        ("reading another owner's file", lambda h: h.get(f"/v1/files/{alice_file}/content")),
        ("unknown model", chat(model="ft:tiny:alice::00000000")),
    ]


def test_32_clients_bad_requests_never_hurt_good_ones(live: Live, bob_file: str, alice_file: str) -> None:
    bad = _bad_requests(bob_file, alice_file)
    with live.http(BOB) as http:
        bob_before = {f["id"] for f in http.get("/v1/files").json()["data"]}
        jobs_before = len(http.get("/v1/fine_tuning/jobs").json()["data"])
    good_failures: list[str] = []
    bad_failures: list[str] = []
    counts = {"good": 0, "bad": 0}
    lock = threading.Lock()

    def good(i: int) -> None:
        client = live.client(ALICE, timeout=TIMEOUT)
        try:
            for j in range(3):
                r = client.chat.completions.create(model=BASE, messages=USER, max_tokens=8, temperature=0.7,
                                                   seed=i * 10 + j)
                assert r.choices[0].finish_reason in ("stop", "length")
            stream = client.chat.completions.create(model=BASE, messages=USER, max_tokens=8, stream=True)
            assert [c for c in stream]
            assert BASE in [m.id for m in client.models.list().data]
            client.files.list()
            with live.http(ALICE, timeout=TIMEOUT) as http:
                assert http.get("/health").json() == {"status": "ok"}
            with lock:
                counts["good"] += 1
        except Exception as e:  # recorded, asserted below: a good request must never fail
            with lock:
                good_failures.append(f"client {i}: {type(e).__name__}: {e}")

    def hostile(i: int) -> None:
        with live.http(BOB, timeout=TIMEOUT) as http:
            for k in range(len(bad)):
                name, send = bad[(i + k) % len(bad)]
                start = time.time()
                try:
                    r = send(http)
                except httpx.HTTPError as e:
                    with lock:
                        bad_failures.append(f"{name}: no answer ({type(e).__name__})")
                    continue
                ok = 400 <= r.status_code < 500 and bool(r.json().get("error", {}).get("code"))
                with lock:
                    counts["bad"] += 1
                    if not ok or time.time() - start > TIMEOUT:
                        bad_failures.append(f"{name}: {r.status_code} {r.text[:200]}")

    threads = [threading.Thread(target=good, args=(i,)) for i in range(16)]
    threads += [threading.Thread(target=hostile, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    deadline = time.time() + 600
    for t in threads:
        t.join(max(1.0, deadline - time.time()))
    assert not any(t.is_alive() for t in threads), "clients still running after 600 s"
    assert not good_failures, good_failures[:5]
    assert not bad_failures, bad_failures[:5]
    assert counts == {"good": 16, "bad": 16 * len(bad)}
    # bob's flood left nothing behind: none of his bad uploads or jobs was stored.
    with live.http(BOB) as http:
        assert {f["id"] for f in http.get("/v1/files").json()["data"]} == bob_before
        assert len(http.get("/v1/fine_tuning/jobs").json()["data"]) == jobs_before
