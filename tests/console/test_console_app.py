"""The console's sign-in, CSRF and owner rules in process (FastAPI TestClient on a fake engine, no browser):
cookie flags, a state change refused without the session's CSRF token, one owner's job invisible to another,
the open console without keys, and a page that works without the built chart assets."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from fake_engine import FakeEngine
from fastapi.testclient import TestClient

from tunelab.jobs.app import build_jobs_app
from tunelab.jobs.service import JobsSettings
from tunelab.server.settings import ServerSettings

KEYS = {"sk-alice": "alice", "sk-bob": "bob"}


def _rows(n: int) -> bytes:
    return "".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"},
                                            {"role": "assistant", "content": f"a{i}"}]}) + "\n"
                   for i in range(n)).encode()


def _app(tmp_path: Path, keys: dict[str, str]) -> TestClient:
    engine = FakeEngine(base="fake-base", adapters=())
    app = build_jobs_app(engine, ServerSettings(api_keys=keys),
                         JobsSettings(data_dir=tmp_path, base_model="fake-base", served_names=("fake-base",)))
    return TestClient(app, base_url="http://127.0.0.1")  # no lifespan: no workers start, jobs stay queued


def _csrf(client: TestClient, path: str = "/console/jobs") -> str:
    m = re.search(r'name="csrf-token" content="([^"]+)"', client.get(path).text)
    assert m, "no CSRF token on the page"
    return m.group(1)


def _sign_in(client: TestClient, key: str) -> str:
    token = _csrf(client, "/console/login")
    r = client.post("/console/login", data={"key": key, "csrf": token, "next": "/console/jobs"},
                    follow_redirects=False)
    assert r.status_code == 303, r.text
    return _csrf(client)


def test_sign_in_cookie_and_csrf(tmp_path: Path) -> None:
    with _app(tmp_path, KEYS) as c:
        assert c.get("/", follow_redirects=False).headers["location"] == "/console/"
        r = c.get("/console/jobs", follow_redirects=False)
        assert r.status_code == 303 and r.headers["location"].startswith("/console/login")
        login = c.get("/console/login")
        cookie = login.headers["set-cookie"]
        assert "HttpOnly" in cookie and "SameSite=strict" in cookie.replace("Strict", "strict")
        token = _csrf(c, "/console/login")
        bad = c.post("/console/login", data={"key": "sk-nope", "csrf": token})
        assert bad.status_code == 401 and "unknown API key" in bad.text
        no_csrf = c.post("/console/login", data={"key": "sk-alice", "csrf": "x"})
        assert no_csrf.status_code == 403
        before = c.cookies.get("tunelab_console")
        csrf = _sign_in(c, "sk-alice")
        assert c.cookies.get("tunelab_console") != before  # a new session id once signed in
        assert "signed in as" in c.get("/console/jobs").text
        files = {"file": ("train.jsonl", _rows(12), "application/jsonl")}
        assert c.post("/console/api/files", files=files).status_code == 403  # no CSRF header
        up = c.post("/console/api/files", files=files, headers={"X-CSRF-Token": csrf})
        assert up.status_code == 200, up.text
        # The API's own answer for a key-less request is untouched by the console's cookie.
        assert c.get("/v1/files").status_code == 401


def test_owners_see_only_their_own(tmp_path: Path) -> None:
    with _app(tmp_path, KEYS) as alice, TestClient(alice.app, base_url="http://127.0.0.1") as bob:
        csrf = _sign_in(alice, "sk-alice")
        f = alice.post("/console/api/files", files={"file": ("t.jsonl", _rows(12), "application/jsonl")},
                       headers={"X-CSRF-Token": csrf}).json()
        job = alice.post("/console/api/jobs", json={"model": "fake-base", "training_file": f["id"]},
                         headers={"X-CSRF-Token": csrf}).json()
        assert job["id"].startswith("ftjob-")
        assert job["id"] in alice.get("/console/jobs").text
        bcsrf = _sign_in(bob, "sk-bob")
        assert job["id"] not in bob.get("/console/jobs").text
        assert bob.get(f"/console/jobs/{job['id']}").status_code == 404
        assert bob.get(f"/console/data/{f['id']}").status_code == 404
        r = bob.post(f"/console/api/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": bcsrf})
        assert r.status_code == 404
        # Bob's session token is not Alice's: her CSRF token does not work in his session.
        assert bob.post(f"/console/api/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": csrf}).status_code == 403
        # Pause and resume are the API's own state changes (no workers run here: the job waits to validate).
        paused = alice.post(f"/console/api/jobs/{job['id']}/pause", headers={"X-CSRF-Token": csrf}).json()
        assert paused["status"] == "paused"
        resumed = alice.post(f"/console/api/jobs/{job['id']}/resume", headers={"X-CSRF-Token": csrf}).json()
        assert resumed["status"] == "validating_files"
        # A blind pair is its starter's alone; the vote lands in the judge --human store and summary.
        pair = alice.post("/console/api/pairs", json={"x": "fake-base", "y": "fake-base", "prompt": "hi"},
                          headers={"X-CSRF-Token": csrf}).json()["pair"]
        assert bob.post("/console/api/votes", json={"pair": pair, "verdict": "A"},
                        headers={"X-CSRF-Token": bcsrf}).status_code == 404
        voted = alice.post("/console/api/votes", json={"pair": pair, "verdict": "tie"},
                           headers={"X-CSRF-Token": csrf}).json()
        assert voted["summary"]["n"] == 1 and voted["summary"]["ties"] == 1
        from tunelab.eval.judge import summarize_human

        (store,) = (tmp_path / "judge").glob("alice-*/human-*.jsonl")
        assert summarize_human(store)["n"] == 1
        # A bad hyperparameter is refused with its field, as the API refuses it.
        bad = alice.post("/console/api/jobs", json={"model": "fake-base", "training_file": f["id"],
                                                    "hyperparameters": {"n_epochs": 0}},
                         headers={"X-CSRF-Token": csrf})
        assert bad.status_code == 400 and "n_epochs" in bad.text


def test_open_without_keys_and_no_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.console import app as console_app

    monkeypatch.setattr(console_app, "CHART_JS", tmp_path / "missing.js")
    with _app(tmp_path, {}) as c:
        page = c.get("/console/jobs")
        assert page.status_code == 200 and "local (no API keys)" in page.text
        csrf = _csrf(c)
        bad = c.post("/console/api/files", files={"file": ("bad.jsonl", b'{"messages": [}\n', "text/plain")},
                     headers={"X-CSRF-Token": csrf})
        assert bad.status_code == 400 and "line 1" in bad.json()["error"]["message"]
        good = c.post("/console/api/files", files={"file": ("t.jsonl", _rows(12), "text/plain")},
                      headers={"X-CSRF-Token": csrf}).json()
        job = c.post("/console/api/jobs", json={"model": "fake-base", "training_file": good["id"]},
                     headers={"X-CSRF-Token": csrf}).json()
        page = c.get(f"/console/jobs/{job['id']}").text
        assert "make console-assets" in page and "uPlot.iife.min.js" not in page
        for path in ("/console/data", "/console/models", "/console/playground", "/console/plan"):
            assert c.get(path).status_code == 200, path


def test_job_event_stream(tmp_path: Path) -> None:
    """The job page's server-sent events: every event in order with its id, the job, then `end` once the job
    is finished; another owner gets 404 before any stream starts."""
    with _app(tmp_path, KEYS) as alice, TestClient(alice.app, base_url="http://127.0.0.1") as bob:
        csrf = _sign_in(alice, "sk-alice")
        f = alice.post("/console/api/files", files={"file": ("t.jsonl", _rows(12), "application/jsonl")},
                       headers={"X-CSRF-Token": csrf}).json()
        job = alice.post("/console/api/jobs", json={"model": "fake-base", "training_file": f["id"]},
                         headers={"X-CSRF-Token": csrf}).json()
        alice.post(f"/console/api/jobs/{job['id']}/cancel", headers={"X-CSRF-Token": csrf})
        _sign_in(bob, "sk-bob")
        assert bob.get(f"/console/api/jobs/{job['id']}/stream").status_code == 404
        r = alice.get(f"/console/api/jobs/{job['id']}/stream")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        blocks = [b for b in r.text.split("\n\n") if b.startswith(("id:", "event:"))]
        kinds = [re.search(r"^event: (\S+)", b, re.M).group(1) for b in blocks]  # type: ignore[union-attr]
        assert kinds[-1] == "end" and "job" in kinds and kinds.count("job-event") >= 3
        messages = [json.loads(b.split("data: ", 1)[1])["message"] for b in blocks if "event: job-event" in b]
        assert messages[0].startswith("Created fine-tuning job") and messages[-1] == "Fine-tuning job cancelled"
        first_id = re.search(r"^id: (\S+)", blocks[0], re.M).group(1)  # type: ignore[union-attr]
        resumed = alice.get(f"/console/api/jobs/{job['id']}/stream", headers={"Last-Event-ID": first_id}).text
        assert "Created fine-tuning job" not in resumed and "Fine-tuning job cancelled" in resumed
