"""Synthetic data: ask a stronger model behind any OpenAI-compatible endpoint (OpenAI itself, `tunelab serve`,
vLLM, ...) for new chat examples from seed topics or seed examples, in JSON mode, with bounded concurrency,
retries with exponential backoff, an on-disk cache (an interrupted run resumes without paying twice), an
optional judge pass that scores each example and drops weak ones, and exact + near-duplicate removal at the
end. Output is `messages` JSONL; every example carries `metadata.generator` so `contamination` can flag
training data made by the same generator as an evaluation set.

Every job ends as a written row or a reject with its reason: jobs = rows out + rows rejected. A reject's
"line" is the job number (1-based, in topic order).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tunelab.data.toolkit.io import JsonlWriter, RejectWriter, StepReport, default_rejects, progress
from tunelab.errors import TunelabError

GEN_PROMPT = """You write training data for a chat assistant.
Topic: {topic}
{examples}Write one new, realistic user request about this topic and an excellent, accurate assistant reply.
Variation #{variant}: make it different from other variations.
Return only a JSON object: {{"messages": [{{"role": "user", "content": "..."}}, {{"role": "assistant", "content": "..."}}]}}"""

JUDGE_PROMPT = """Rate this training example for a chat assistant from 1 (useless or wrong) to 10 (excellent:
accurate, helpful, well written). Return only a JSON object: {{"score": <integer 1-10>, "reason": "..."}}

Example:
{example}"""


class SynthConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str = "https://api.openai.com/v1"
    model: str = "gpt-4o-mini"
    api_key_env: str = "OPENAI_API_KEY"
    """Name of the environment variable holding the API key (never the key itself)."""
    per_topic: int = Field(default=1, ge=1)
    concurrency: int = Field(default=4, ge=1, le=256)
    max_retries: int = Field(default=3, ge=0)
    backoff: float = Field(default=1.0, ge=0)
    """First retry waits this many seconds, doubling (with jitter) each time."""
    timeout: float = Field(default=60.0, gt=0)
    temperature: float = Field(default=0.9, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    judge: bool = False
    judge_model: str | None = None
    """Defaults to `model`."""
    min_score: int = Field(default=7, ge=1, le=10)
    dedup: bool = True
    cache_dir: str = ".tunelab-synth-cache"
    seed_examples_per_prompt: int = Field(default=2, ge=0)


@dataclass
class _Job:
    index: int
    topic: str
    variant: int
    prompt: str


class _Failure(Exception):
    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class _Cache:
    """One JSON file per request key, written atomically; safe for concurrent threads and reruns."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> Any:
        p = self._path(key)
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            return None  # a damaged entry is regenerated

    def put(self, key: str, value: Any) -> None:
        p = self._path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(value, ensure_ascii=False), encoding="utf-8")
        tmp.replace(p)


def request_key(kind: str, model: str, prompt: str, temperature: float) -> str:
    return hashlib.sha256(json.dumps([kind, model, prompt, temperature]).encode()).hexdigest()


def _as_messages(data: Any) -> list[dict[str, str]]:
    """Accept {"messages": [...]} or {"prompt", "response"}; raise _Failure for anything else."""
    if isinstance(data, dict) and isinstance(data.get("messages"), list):
        msgs = []
        for m in data["messages"]:
            if not (isinstance(m, dict) and m.get("role") in ("system", "user", "assistant")
                    and isinstance(m.get("content"), str) and m["content"].strip()):
                raise _Failure("bad_schema", "a message lacks a valid role or content")
            msgs.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" for m in msgs) or not any(m["role"] == "user" for m in msgs):
            raise _Failure("bad_schema", "needs a user and an assistant message")
        return msgs
    if isinstance(data, dict) and isinstance(data.get("prompt"), str) and isinstance(data.get("response"), str):
        return [{"role": "user", "content": data["prompt"]}, {"role": "assistant", "content": data["response"]}]
    raise _Failure("bad_schema", "JSON has neither 'messages' nor 'prompt'/'response'")


class Synthesizer:
    """Talks to one OpenAI-compatible endpoint with retries and the cache; counts everything it does."""

    def __init__(self, cfg: SynthConfig, client: Any = None) -> None:
        self.cfg = cfg
        self.cache = _Cache(cfg.cache_dir)
        self.calls = 0
        self.cache_hits = 0
        self.errors: Counter[str] = Counter()
        self._lock = threading.Lock()
        if client is None and cfg.base_url == "local":
            from tunelab.generate import Generator, LocalChatClient

            client = LocalChatClient(Generator.load(cfg.model))  # generates in this process, via the engine
        if client is None:
            from openai import OpenAI

            key = os.environ.get(cfg.api_key_env)
            if not key:
                if "api.openai.com" in cfg.base_url:
                    raise TunelabError(f"synth: set the API key in the environment variable {cfg.api_key_env}", 2)
                key = "none"  # local servers usually accept any key
            # Retries are ours (they also cover broken JSON), so the client's own are off.
            client = OpenAI(base_url=cfg.base_url, api_key=key, max_retries=0, timeout=cfg.timeout)
        self.client = client

    def _call_json(self, model: str, prompt: str) -> Any:
        import openai

        kwargs: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": prompt}],
                                  "temperature": self.cfg.temperature, "response_format": {"type": "json_object"}}
        if self.cfg.max_tokens:
            kwargs["max_tokens"] = self.cfg.max_tokens
        with self._lock:
            self.calls += 1
        try:
            resp = self.client.chat.completions.create(**kwargs)
        except openai.APITimeoutError as e:
            raise _Failure("timeout", "request timed out") from e
        except openai.APIStatusError as e:
            raise _Failure(f"http_{e.status_code}", f"server answered {e.status_code}") from e
        except openai.APIConnectionError as e:
            raise _Failure("connection", "cannot reach the endpoint") from e
        try:
            content = resp.choices[0].message.content or ""
        except (AttributeError, IndexError) as e:
            raise _Failure("bad_response", "no choices in the response") from e
        try:
            return json.loads(content)
        except json.JSONDecodeError as e:
            raise _Failure("bad_json", f"content is not JSON: {e.msg}") from e

    def cached(self, kind: str, model: str, prompt: str, parse: Any) -> Any:
        """Cache hit, or call with retries and backoff; the parsed value is cached only when it is valid."""
        key = request_key(kind, model, prompt, self.cfg.temperature)
        hit = self.cache.get(key)
        if hit is not None:
            with self._lock:
                self.cache_hits += 1
            return hit
        last: _Failure | None = None
        for attempt in range(self.cfg.max_retries + 1):
            if attempt:
                time.sleep(self.cfg.backoff * (2 ** (attempt - 1)) * (0.5 + random.random()))
            try:
                value = parse(self._call_json(model, prompt))
            except _Failure as f:
                with self._lock:
                    self.errors[f.kind] += 1
                last = f
                continue
            self.cache.put(key, value)
            return value
        assert last is not None
        raise last

    def generate(self, job: _Job) -> list[dict[str, str]]:
        return self.cached("gen", self.cfg.model, job.prompt, _as_messages)  # type: ignore[no-any-return]

    def judge(self, messages: list[dict[str, str]]) -> dict[str, Any]:
        def parse(d: Any) -> dict[str, Any]:
            score = d.get("score") if isinstance(d, dict) else None
            if isinstance(score, bool) or not isinstance(score, int | float) or not 1 <= score <= 10:
                raise _Failure("bad_judgement", "judge gave no score in 1..10")
            return {"score": float(score), "reason": str(d.get("reason", ""))[:500]}

        prompt = JUDGE_PROMPT.format(example=json.dumps({"messages": messages}, ensure_ascii=False, indent=1))
        return self.cached("judge", self.cfg.judge_model or self.cfg.model, prompt, parse)  # type: ignore[no-any-return]


def make_jobs(topics: list[str], seed_examples: list[dict[str, Any]], cfg: SynthConfig) -> list[_Job]:
    """One job per (topic, variant). Seed examples become few-shot context; without topics, each seed
    example is itself the topic ("more like this")."""
    if not topics and not seed_examples:
        raise TunelabError("synth: give seed topics (--topics) or seed examples (--seed-examples)", 2)
    shots = ""
    if seed_examples and cfg.seed_examples_per_prompt:
        picked = seed_examples[: cfg.seed_examples_per_prompt]
        shots = "Examples of the style wanted:\n" + "\n".join(json.dumps(e, ensure_ascii=False) for e in picked) + "\n"
    subjects = topics or [
        "like this example: " + json.dumps(e, ensure_ascii=False)[:2000] for e in seed_examples
    ]
    jobs: list[_Job] = []
    for t in subjects:
        for v in range(cfg.per_topic):
            jobs.append(_Job(len(jobs), t, v, GEN_PROMPT.format(topic=t, examples=shots, variant=v + 1)))
    return jobs


def synth(
    output: str | Path,
    topics: list[str] | None = None,
    seed_examples: list[dict[str, Any]] | None = None,
    config: SynthConfig | None = None,
    rejects: str | Path | None = None,
    *,
    client: Any = None,
) -> StepReport:
    """Generate examples into `output`; failed, weak and duplicate ones go to `rejects` with the reason."""
    cfg = config or SynthConfig()
    t0 = time.perf_counter()
    rejects = Path(rejects or default_rejects(output))
    jobs = make_jobs(topics or [], seed_examples or [], cfg)
    rep = StepReport("synth", f"{len(jobs)} jobs", str(output), str(rejects), rows_in=len(jobs))
    s = Synthesizer(cfg, client)
    results: dict[int, dict[str, Any]] = {}
    failed: dict[int, tuple[str, str]] = {}

    def run(job: _Job) -> tuple[int, dict[str, Any]]:
        msgs = s.generate(job)
        row: dict[str, Any] = {"messages": msgs,
                               "metadata": {"generator": {"model": cfg.model, "topic": job.topic[:200]}}}
        if cfg.judge:
            row["metadata"]["judge"] = s.judge(msgs)
        return job.index, row

    with progress() as bar, ThreadPoolExecutor(cfg.concurrency) as pool:
        task = bar.add_task(f"generating with {cfg.model}", total=len(jobs))
        futures = {pool.submit(run, j): j for j in jobs}
        for fut in as_completed(futures):
            job = futures[fut]
            try:
                i, row = fut.result()
                results[i] = row
            except _Failure as f:
                failed[job.index] = (f.kind, str(f))
            bar.advance(task)
    rej = RejectWriter(rejects, "synth")
    staged = Path(output).with_name(f".{Path(output).name}.synth-staged.jsonl")
    writer = JsonlWriter(staged)
    staged_job: list[int] = []  # staged line - 1 -> job number (1-based), so dedup rejects name the job
    for job in jobs:  # job order, so output order does not depend on thread timing
        if job.index in failed:
            kind, msg = failed[job.index]
            rej.write(job.index + 1, "generation_failed", {"topic": job.topic}, error=kind, message=msg)
            continue
        row = results[job.index]
        judged = row["metadata"].get("judge")
        if judged is not None and judged["score"] < cfg.min_score:
            rej.write(job.index + 1, "judge_low_score", row, score=judged["score"])
            continue
        writer.write(row)
        staged_job.append(job.index + 1)
    writer.close()
    rej.close()
    rep.details = {"api_calls": s.calls, "cache_hits": s.cache_hits, "errors": dict(s.errors),
                   "model": cfg.model, "base_url": cfg.base_url, "judge": cfg.judge}
    if cfg.dedup and writer.count:
        from tunelab.data.toolkit.dedup import dedup

        dup_rejects = staged.with_name(staged.name + ".rejects")
        d = dedup(staged, output, rejects=dup_rejects)
        with rejects.open("a", encoding="utf-8") as fh:
            for line in dup_rejects.read_text(encoding="utf-8").splitlines():
                rec = json.loads(line)
                rec["step"] = "synth"
                rec["line"] = staged_job[rec["line"] - 1]
                if isinstance(rec.get("duplicate_of"), int):
                    rec["duplicate_of"] = staged_job[rec["duplicate_of"] - 1]
                fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
        dup_rejects.unlink()
        staged.unlink()
        for k, v in d.reasons.items():
            rej.counts[k] += v
        rep.rows_out = d.rows_out
    else:
        staged.replace(output)
        rep.rows_out = writer.count
    rep.rows_rejected = rej.total
    rep.reasons = dict(rej.counts)
    rep.seconds = round(time.perf_counter() - t0, 3)
    rep.check()
    return rep
