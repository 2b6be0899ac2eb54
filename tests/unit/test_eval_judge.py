"""The blind judge against fake OpenAI-compatible endpoints on 127.0.0.1 (one that always prefers position A,
one that prefers the better model), the statistics, and the resumable human mode."""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tunelab.eval.config import JudgeSettings
from tunelab.eval.judge import (
    Judge,
    Pair,
    human_judge,
    judge_pairs,
    pairs_from_results,
    parse_verdict,
    summarize,
    wilson,
)

Decide = Callable[[str, str], str]  # (answer A, answer B) -> reply text


def _answers(prompt: str) -> tuple[str, str]:
    m = re.search(r"\[Answer A\]\n(.*?)\n\n\[Answer B\]\n(.*?)\n\nWhich answer", prompt, re.DOTALL)
    assert m, prompt
    return m.group(1), m.group(2)


@pytest.fixture
def endpoint() -> Iterator[Callable[[Decide], tuple[str, list[dict[str, Any]]]]]:
    servers: list[ThreadingHTTPServer] = []

    def start(decide: Decide) -> tuple[str, list[dict[str, Any]]]:
        seen: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                seen.append({"path": self.path, "body": body, "auth": self.headers.get("Authorization")})
                a, b = _answers(body["messages"][-1]["content"])
                reply = {
                    "id": "cmpl-1", "object": "chat.completion", "created": 0, "model": body["model"],
                    "choices": [{"index": 0, "finish_reason": "stop",
                                 "message": {"role": "assistant", "content": decide(a, b)}}],
                    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                }
                data = json.dumps(reply).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        srv = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=srv.serve_forever, daemon=True).start()
        servers.append(srv)
        return f"http://127.0.0.1:{srv.server_address[1]}/v1", seen

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def _pairs(n: int = 20, x_better: float = 0.8) -> list[Pair]:
    """X's answer is marked GOOD on the first x_better share of prompts, Y's on the rest."""
    k = round(n * x_better)
    return [Pair(str(i), f"question {i}", f"{'GOOD' if i < k else 'meh'} x{i}", f"{'meh' if i < k else 'GOOD'} y{i}")
            for i in range(n)]


def test_judge_that_prefers_a_model(endpoint: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("JUDGE_KEY", "sekrit")
    url, seen = endpoint(lambda a, b: "A" if "GOOD" in a else "B")
    j = Judge(JudgeSettings(base_url=url, model="fake-judge", api_key_env="JUDGE_KEY", concurrency=2))
    out = judge_pairs(_pairs(20, 0.8), j)
    s = out["summary"]
    assert (s["wins"], s["ties"], s["losses"]) == (16, 0, 4)
    assert s["win_rate"] == pytest.approx(0.8)
    lo, hi = s["ci95"]
    assert lo < 0.8 < hi and lo > 0.5  # 16/20 is significantly better than a coin
    assert s["swap_agreement"] == 1.0
    assert s["position_a_rate"] == pytest.approx(0.5) and s["position_bias_detected"] is False
    assert len(seen) == 40 and all(r["path"] == "/v1/chat/completions" for r in seen)
    assert seen[0]["auth"] == "Bearer sekrit" and seen[0]["body"]["model"] == "fake-judge"
    assert seen[0]["body"]["temperature"] == 0
    # The order is random and recorded: both first orders occur, and each record's calls are swapped.
    firsts = [r["calls"][0]["x_is_a"] for r in out["pairs"]]
    assert 0 < sum(firsts) < len(firsts)
    assert all(r["calls"][0]["x_is_a"] != r["calls"][1]["x_is_a"] for r in out["pairs"])


def test_judge_that_prefers_a_position_is_detected(endpoint: Any) -> None:
    url, _ = endpoint(lambda a, b: "A")
    out = judge_pairs(_pairs(20, 0.8), Judge(JudgeSettings(base_url=url, model="m")))
    s = out["summary"]
    assert s["position_a_rate"] == 1.0 and s["position_bias_detected"] is True
    assert s["swap_agreement"] == 0.0
    assert (s["wins"], s["ties"], s["losses"]) == (0, 20, 0)  # every verdict flipped with the order: ties
    assert s["win_rate"] == pytest.approx(0.5)


def test_single_order_judge_and_unparseable_replies(endpoint: Any) -> None:
    url, seen = endpoint(lambda a, b: "I cannot decide")
    out = judge_pairs(_pairs(6), Judge(JudgeSettings(base_url=url, model="m", both_orders=False, seed=3)))
    assert len(seen) == 6
    assert out["summary"]["invalid_replies"] == 6 and out["summary"]["ties"] == 6
    assert "swap_agreement" not in out["summary"]


def test_unreachable_judge_is_a_clean_error() -> None:
    from tunelab.errors import ConfigError, TunelabError

    with pytest.raises(TunelabError, match="request failed"):
        j = Judge(JudgeSettings(base_url="http://127.0.0.1:9/v1", model="m", timeout_s=2))
        j.client = j.client.with_options(max_retries=0)
        judge_pairs(_pairs(1), j)
    with pytest.raises(ConfigError, match="base_url"):
        Judge(JudgeSettings())


def test_statistics_by_hand() -> None:
    # Wilson 95% for 8/10: centre (0.8 + 1.96^2/20) / (1 + 1.96^2/10) = 0.7167, half-width 0.2265.
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    s = summarize(["win", "win", "tie", "loss"])
    assert s["win_rate"] == pytest.approx(2.5 / 4)
    assert parse_verdict("Answer: B.") == "B" and parse_verdict("tie") == "tie" and parse_verdict("") == "invalid"
    assert parse_verdict("A") == "A" and parse_verdict("ANSWER") == "invalid"


def test_pairs_from_results_defaults() -> None:
    res = {
        "targets": [{"name": "base"}, {"name": "run1"}],
        "examples": [{"index": 0, "prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}],
                      "outputs": {"base": "b0", "run1": "r0"}}],
    }
    pairs, x, y = pairs_from_results(res)
    assert (x, y) == ("run1", "base") and pairs == [Pair("0", "Q", "r0", "b0")]  # the judge never sees a system prompt
    from tunelab.errors import TunelabError

    with pytest.raises(TunelabError, match="no model named 'nope'"):
        pairs_from_results(res, x="nope")


def test_human_mode_is_blind_and_resumes(tmp_path: Path) -> None:
    pairs = _pairs(5, 0.6)
    out = tmp_path / "human.jsonl"
    shown: list[str] = []

    def scripted(answers: list[str]) -> Callable[[str], str]:
        it = iter(answers)
        return lambda _prompt: next(it)

    # Session 1: an invalid key is asked again; two judged; quit.
    s1 = human_judge(pairs, out, x_name="ft", y_name="base", ask=scripted(["x", "a", "b", "q"]), show=shown.append)
    assert s1["n"] == 2
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == ["0", "1"]
    for r in recs:  # the recorded order matches what was on screen, and the outcome follows from it
        screen = next(t for t in shown if f"=== pair {r['id']} " in t)
        shown_a = screen.split("[A]\n")[1].split("\n\n[B]")[0]
        assert shown_a == (pairs[int(r["id"])].x if r["x_is_a"] else pairs[int(r["id"])].y)
        x_won = (r["verdict"] == "A") == r["x_is_a"]
        assert r["outcome"] == ("win" if x_won else "loss")
    assert any("please type" in t for t in shown)

    # Session 2 resumes at pair 2: pairs 0 and 1 are not shown again; a skip leaves pair 3 open.
    shown.clear()
    human_judge(pairs, out, x_name="ft", y_name="base", ask=scripted(["t", "s", "a"]), show=shown.append)
    assert [t.split("=== pair ")[1].split(" ")[0] for t in shown if "=== pair" in t] == ["2", "3", "4"]
    # Session 3 finishes the skipped one; end of input (EOF) is treated as quit.
    shown.clear()
    s3 = human_judge(pairs, out, x_name="ft", y_name="base", ask=scripted(["a"]), show=shown.append)
    ids = [json.loads(line)["id"] for line in out.read_text().splitlines()]
    assert sorted(ids) == ["0", "1", "2", "3", "4"] and len(ids) == 5
    assert s3["n"] == 5 and s3["ties"] == 1 and s3["x"] == "ft"

    def eof(_prompt: str) -> str:
        raise EOFError

    assert human_judge(pairs, out, x_name="ft", y_name="base", ask=eof, show=shown.append)["n"] == 5


def test_cli_judge_reads_results_and_writes_judgements(endpoint: Any, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    run = tmp_path / "run"
    (run / "eval").mkdir(parents=True)
    examples = [{"index": i, "prompt": [{"role": "user", "content": f"q{i}"}],
                 "outputs": {"base": f"meh {i}", "run": f"GOOD {i}" if i < 9 else f"bad {i}"}} for i in range(10)]
    res = {"kind": "tunelab-eval", "targets": [{"name": "base"}, {"name": "run"}], "examples": examples,
           "eval_config": {"judge": {"seed": 7}}}
    (run / "eval" / "results.json").write_text(json.dumps(res))
    url, seen = endpoint(lambda a, b: "A" if "GOOD" in a else ("B" if "GOOD" in b else "TIE"))
    with pytest.raises(SystemExit) as e:
        main(["judge", str(run), "--base-url", url, "--model", "fake"])
    assert e.value.code == 0, capsys.readouterr().err
    out = json.loads((run / "eval" / "judge.json").read_text())
    assert (out["x"], out["y"], out["judge_model"]) == ("run", "base", "fake")
    assert (out["summary"]["wins"], out["summary"]["ties"], out["summary"]["losses"]) == (9, 1, 0)
    assert out["summary"]["win_rate"] == pytest.approx(0.95) and len(seen) == 20
    assert "blind win rate: run vs base" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:  # no endpoint configured: a clean error, not a traceback
        main(["judge", str(run)])
    assert e.value.code == 2 and "judge.base_url" in capsys.readouterr().err
