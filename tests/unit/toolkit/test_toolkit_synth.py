"""synth against a fake OpenAI-compatible endpoint on 127.0.0.1 that sometimes fails (HTTP 500), times out,
and returns broken JSON: failures are retried, successes cached (a rerun pays nothing twice), nothing crashes,
and every job is either written or reported in the rejects file."""

from __future__ import annotations

import json
import re
import threading
import time
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from toolkit_helpers import read_jsonl

from tunelab.data.readers import read_conversations
from tunelab.data.toolkit.synth import SynthConfig, synth


class FakeOpenAI:
    """Behaviour is chosen by the topic in the prompt; `calls` counts requests per topic."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()
        self.lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                assert body["response_format"] == {"type": "json_object"}
                status, content, delay = fake.answer(body["messages"][-1]["content"])
                if delay:
                    time.sleep(delay)
                if status != 200:
                    payload = json.dumps({"error": {"message": "boom", "type": "server_error"}}).encode()
                else:
                    payload = json.dumps({
                        "id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                    }).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, prompt: str) -> tuple[int, str, float]:
        if prompt.startswith("Rate this"):
            with self.lock:
                self.calls["judge"] += 1
            score = 2 if "weak answer" in prompt else 9
            return 200, json.dumps({"score": score, "reason": "fake judge"}), 0.0
        topic = re.search(r"Topic: (.*)", prompt).group(1)  # type: ignore[union-attr]
        variant = re.search(r"Variation #(\d+)", prompt).group(1)  # type: ignore[union-attr]
        key = f"{topic}#{variant}"
        with self.lock:
            self.calls[key] += 1
            n = self.calls[key]
        ok = json.dumps({"messages": [{"role": "user", "content": f"Question about {topic} number {variant}?"},
                                      {"role": "assistant", "content": f"A detailed answer about {topic}, "
                                       f"variation {variant}, with several useful sentences."}]})
        if topic == "flaky" and n == 1:
            return 500, "", 0.0
        if topic == "slow" and n == 1:
            return 200, ok, 2.0
        if topic == "broken" and n == 1:
            return 200, '{"messages": [{"role": "user", "content": "unterminated', 0.0
        if topic == "always-fails":
            return 500, "", 0.0
        if topic == "always-broken":
            return 200, "this is not JSON at all", 0.0
        if topic == "wrong-schema":
            return 200, json.dumps({"answer": 42}), 0.0
        if topic == "weak":
            return 200, json.dumps({"prompt": "Q?", "response": "weak answer"}), 0.0
        if topic.startswith("dup"):  # two topics whose answers are identical
            return 200, json.dumps({"prompt": "What is a duplicate?", "response": "The same thing twice over."}), 0.0
        return 200, ok, 0.0

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    f = FakeOpenAI()
    yield f
    f.close()


TOPICS = ["billing", "flaky", "slow", "broken", "always-fails", "always-broken", "wrong-schema", "weak",
          "dup-a", "dup-b"]


def config(fake: FakeOpenAI, tmp_path: Path, **kw: Any) -> SynthConfig:
    base = dict(base_url=fake.url, model="fake-gpt", timeout=0.5, max_retries=2, backoff=0.01, concurrency=4,
                cache_dir=str(tmp_path / "cache"), judge=True, min_score=5)
    base.update(kw)
    return SynthConfig(**base)


def test_synth_retries_caches_judges_dedups_and_reports(fake: FakeOpenAI, tmp_path: Path) -> None:
    out, rej = tmp_path / "synth.jsonl", tmp_path / "synth.rejects.jsonl"
    rep = synth(out, TOPICS, config=config(fake, tmp_path), rejects=rej)
    rows, rejects = read_jsonl(out), read_jsonl(rej)
    assert rep.rows_in == len(TOPICS) == len(rows) + len(rejects) == rep.rows_out + rep.rows_rejected
    topics_out = sorted(r["metadata"]["generator"]["topic"] for r in rows)
    # flaky (500), slow (timeout) and broken (bad JSON) recovered on retry; one of the two duplicates kept
    assert topics_out == ["billing", "broken", "dup-a", "flaky", "slow"]
    why = {(r["row"].get("topic") or r["row"]["metadata"]["generator"]["topic"]): r for r in rejects}
    assert why["always-fails"]["reason"] == "generation_failed" and why["always-fails"]["error"] == "http_500"
    assert why["always-broken"]["error"] == "bad_json"
    assert why["wrong-schema"]["error"] == "bad_schema"
    assert why["weak"]["reason"] == "judge_low_score" and why["weak"]["score"] == 2
    assert why["dup-b"]["reason"] == "exact_duplicate"
    assert (why["dup-b"]["line"], why["dup-b"]["duplicate_of"]) == (10, 9)  # job numbers of dup-b and dup-a
    assert fake.calls["always-fails#1"] == 3  # 1 try + 2 retries
    assert {"http_500", "timeout", "bad_json", "bad_schema"} <= set(rep.details["errors"])
    assert rows[0]["metadata"]["judge"]["score"] == 9 and rows[0]["metadata"]["generator"]["model"] == "fake-gpt"
    assert len(read_conversations(out)) == 5  # valid training data

    # An interrupted/repeated run pays only for what never succeeded: the rest comes from the cache.
    before = Counter(fake.calls)
    rep2 = synth(out, TOPICS, config=config(fake, tmp_path), rejects=rej)
    new_calls = fake.calls - before
    assert set(new_calls) == {"always-fails#1", "always-broken#1", "wrong-schema#1"}
    assert rep2.details["cache_hits"] == 7 + 7  # 7 generations + 7 judgements
    assert read_jsonl(out) == rows


def test_per_topic_variants_and_seed_examples(fake: FakeOpenAI, tmp_path: Path) -> None:
    seeds = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}]
    cfg = config(fake, tmp_path, per_topic=3, judge=False)
    rep = synth(tmp_path / "o.jsonl", ["returns"], seeds, cfg)
    assert rep.rows_out == 3 and rep.details["api_calls"] == 3
    assert {fake.calls[f"returns#{i}"] for i in (1, 2, 3)} == {1}


def test_unreachable_endpoint_is_reported_not_raised(tmp_path: Path) -> None:
    cfg = SynthConfig(base_url="http://127.0.0.1:9/v1", model="m", timeout=0.5, max_retries=1, backoff=0.01,
                      cache_dir=str(tmp_path / "c"))
    rep = synth(tmp_path / "o.jsonl", ["a", "b"], config=cfg)
    assert rep.rows_out == 0 and rep.reasons == {"generation_failed": 2}
    assert rep.details["errors"] == {"connection": 4}


def test_needs_topics_or_seeds(tmp_path: Path) -> None:
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="seed topics"):
        synth(tmp_path / "o.jsonl", [], [], SynthConfig(base_url="http://127.0.0.1:9/v1", cache_dir=str(tmp_path)))
