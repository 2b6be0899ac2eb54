"""One test per hardening item (issue 10): no tenant can hurt another, every bad input is a clear 4xx with a
`code`, nothing unsafe is loaded. HTTP behaviour is tested against live servers on 127.0.0.1 (two owners and
more, the official `openai` client, raw httpx for malformed bodies); loops and waits are bounded."""

from __future__ import annotations

import json
import pickle
import random
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
import torch
from fake_engine import FakeEngine
from fastapi import APIRouter
from fastapi.testclient import TestClient
from sechelp import (
    ADMIN,
    ALICE,
    BASE,
    BOB,
    CAROL,
    MAX_UPLOAD,
    InProcess,
    Live,
    chunked,
    deep_json,
    error_of,
    multipart,
)
from tiny import chat_rows, tiny_model

from tunelab.jobs.app import build_jobs_app
from tunelab.jobs.service import JobsService, JobsSettings
from tunelab.jobs.store import Store, jobs, new_id
from tunelab.jobs.workers import WorkerPool
from tunelab.server import ServerSettings, create_app
from tunelab.train import checkpoint as ckpt

USER = [{"role": "user", "content": "hello"}]
FILLER = 65  # a plain byte token the fault test puts in place of end-of-sequence, so every row runs its length


def _body(err: openai.APIStatusError) -> dict[str, Any]:
    body = err.body if isinstance(err.body, dict) else {}
    inner = body.get("error", body)
    assert isinstance(inner, dict) and inner.get("code"), f"an error without a code: {err.body}"
    return inner


# ---------------------------------------------------------------------------------------------- item 1
def test_item1_a_failing_row_fails_alone_and_every_row_ends(monkeypatch: pytest.MonkeyPatch, tok: Any) -> None:
    """A row that raises mid-batch gets its error at once; the row that started the batch and a row that joined
    it mid-way both finish with 200. An out-of-range seed is a 400 naming `seed`."""
    from tunelab.engine import batch
    from tunelab.engine.engine import Engine

    real = batch._advance

    def hooked(seq: Any, tok_id: int, eos_ids: set[int], decode: Any) -> Any:
        time.sleep(0.01)  # slow enough that the later requests join this running batch
        if "BOOM" in json.dumps(seq.request.messages) and len(seq.generated) >= 3:
            raise RuntimeError("injected fault SECRET-DETAIL")
        return real(seq, FILLER if tok_id in eos_ids else tok_id, eos_ids, decode)

    monkeypatch.setattr(batch, "_advance", hooked)
    engine = Engine(tiny_model(), tok, base_name=BASE, batch_wait_s=0)
    server = InProcess(create_app(engine, ServerSettings(api_keys={ALICE: "alice", BOB: "bob"})))
    try:
        alice, bob = server.live.client(ALICE, timeout=120), server.live.client(BOB, timeout=120)
        started, results, ended = threading.Event(), {}, {}

        def first() -> None:
            stream = alice.chat.completions.create(model=BASE, messages=USER, max_tokens=150, temperature=0,
                                                   stream=True)
            pieces = []
            for chunk in stream:
                started.set()
                pieces.append(chunk.choices[0].finish_reason)
            results["first"] = pieces[-1]
            ended["first"] = time.time()

        def call(name: str, key: openai.OpenAI, content: str, max_tokens: int) -> None:
            try:
                r = key.chat.completions.create(model=BASE, messages=[{"role": "user", "content": content}],
                                                max_tokens=max_tokens, temperature=0.8, seed=7)
                results[name] = (r.choices[0].finish_reason, r.usage.completion_tokens if r.usage else 0)
            except openai.APIStatusError as e:
                results[name] = e
            ended[name] = time.time()

        threads = [threading.Thread(target=first)]
        threads[0].start()
        assert started.wait(60), "the first request never started"
        threads += [threading.Thread(target=call, args=("boom", bob, "BOOM please", 150)),
                    threading.Thread(target=call, args=("joiner", alice, "join me", 20))]
        for t in threads[1:]:
            t.start()
        for t in threads:
            t.join(120)
        assert not any(t.is_alive() for t in threads), f"a request never ended: {results}"
        assert results["first"] == "length"
        assert results["joiner"] == ("length", 20)
        err = results["boom"]
        assert isinstance(err, openai.InternalServerError), err
        body = _body(err)
        assert body["code"] == "generation_failed" and "request id" in body["message"]
        assert "SECRET" not in json.dumps(err.body) and "RuntimeError" not in json.dumps(err.body)
        assert ended["boom"] < ended["first"], "the failing request waited for the batch instead of failing at once"
        assert engine.stats["joined"] >= 2  # both later requests joined the running batch

        with pytest.raises(openai.BadRequestError) as bad:
            alice.chat.completions.create(model=BASE, messages=USER, max_tokens=4, temperature=1, seed=2**64)
        assert bad.value.status_code == 400 and _body(bad.value)["param"] == "seed"
        ok = alice.chat.completions.create(model=BASE, messages=USER, max_tokens=4, temperature=1, seed=2**63 - 1,
                                           n=2)
        assert len(ok.choices) == 2  # the largest seed works, for every choice (seed + index)
    finally:
        server.stop()
        engine.close()


def test_item1_a_failed_forward_ends_every_row_it_covered(tok: Any) -> None:
    """The batch's forward pass fails after a row joined: the rows that were running, the joiner included, all
    get an error at once (none waits forever), and the message carries no exception text."""
    import asyncio

    from tunelab.engine.batch import Sequence, run_batch
    from tunelab.engine.types import EngineError, GenerationRequest, SamplingParams

    model = tiny_model()
    calls = {"decode": 0}

    def flaky(**kw: Any) -> Any:
        if kw["input_ids"].shape[1] == 1:
            calls["decode"] += 1
            if calls["decode"] >= 4:
                raise RuntimeError("SECRET forward failure")
        return model(**kw)

    async def scenario() -> list[Any]:
        loop = asyncio.get_running_loop()

        def seq(text: str) -> Sequence:
            req = GenerationRequest(BASE, SamplingParams(max_tokens=50, temperature=0), prompt=text, request_id=text)
            return Sequence(req, list(tok(text)["input_ids"]), None, loop, asyncio.Queue())

        first, joiner = seq("first"), seq("joiner")
        admitted: list[Sequence] = []

        def admit(running: list[Sequence]) -> list[Sequence]:
            if admitted:
                return []
            admitted.append(joiner)
            return [joiner]

        worker = loop.run_in_executor(None, lambda: run_batch(flaky, [first], forward_kwargs=lambda rows: {},
                                                              decode=lambda ids: "x" * len(ids), eos_ids=set(),
                                                              pad_id=0, device=torch.device("cpu"), admit=admit))

        async def last(s: Sequence) -> Any:
            while True:
                item = await asyncio.wait_for(s.queue.get(), timeout=30)
                if isinstance(item, EngineError) or item.finish_reason:
                    return item

        results = await asyncio.gather(last(first), last(joiner))
        await worker
        return results

    with torch.inference_mode():
        ends = asyncio.run(scenario())
    assert all(isinstance(e, EngineError) and e.code == "generation_failed" for e in ends), ends
    assert all("SECRET" not in e.message for e in ends)


# ---------------------------------------------------------------------------------------------- item 2
def test_item2_health_details_only_for_admins_and_never_other_owners(live: Live, tmp_path: Path) -> None:
    for key in (ALICE, BOB):
        r = live.http(key).get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
    assert live.http(None).get("/health").status_code == 401
    r = live.http(ADMIN).get("/health")
    assert r.status_code == 200 and r.json()["model"] == BASE and r.json()["engine"]["worker_alive"] is True

    # The filter, on a jobs app whose engine serves alice's fine-tuned model: an admin of another owner sees
    # neither its name nor that it exists; an admin key of alice's sees it.
    engine = FakeEngine(base="fake-base", adapters=())
    keys = {"sk-a": "alice", "sk-ops": "ops", "sk-a-admin": "alice"}
    app = build_jobs_app(engine, ServerSettings(api_keys=keys, admin_keys=frozenset({"sk-ops", "sk-a-admin"})),
                         JobsSettings(data_dir=tmp_path, base_model="fake-base", served_names=("fake-base",)))
    name = "ft:fake-base:alice::abcd1234"
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    engine.register_adapter(name, tmp_path / "adapter", owned_by="alice")
    app.state.jobs.store.insert(jobs, id=new_id("ftjob-"), owner="alice", model="fake-base", training_file="file-x",
                                status="succeeded", created_at=0, seed=0, hyperparameters={}, method={}, options={},
                                result_files=[], fine_tuned_model=name, pause_requested=False, step=0,
                                metrics_offset=0, last_train_step=0, last_valid_step=-1)
    client = TestClient(app)  # no lifespan: no workers needed here
    assert client.get("/health", headers={"Authorization": "Bearer sk-a"}).json() == {"status": "ok"}
    ops = client.get("/health", headers={"Authorization": "Bearer sk-ops"}).json()
    assert "alice" not in json.dumps(ops) and ops["engine"]["adapters"] == 0
    mine = client.get("/health", headers={"Authorization": "Bearer sk-a-admin"}).json()
    assert mine["engine"]["loaded_adapters"] == [name] and mine["engine"]["adapters"] == 1


# ---------------------------------------------------------------------------------------------- item 3
def test_item3_deep_nesting_is_a_400_naming_the_line_and_500s_carry_only_an_id(live: Live) -> None:
    content = (json.dumps(chat_rows(1)[0]) + "\n" + deep_json(60_000) + "\n").encode()
    with pytest.raises(openai.BadRequestError) as e:
        live.client(ALICE).files.create(file=("deep.jsonl", content), purpose="fine-tune")
    body = _body(e.value)
    assert body["code"] == "invalid_file_format" and "line 2" in body["message"]
    # The same nesting as a request body: a 400, not a 500.
    r = live.http(ALICE).post("/v1/chat/completions", content=deep_json(60_000),
                              headers={"content-type": "application/json"})
    assert r.status_code == 400 and error_of(r)

    # Any unexpected exception: 500 with a request id (message and header), no exception text.
    boom = APIRouter()

    @boom.get("/v1/boom")
    async def explode() -> None:
        raise RuntimeError("SECRET-PATH /srv/data/alice")

    client = TestClient(create_app(FakeEngine(), extra_routers=[boom]), raise_server_exceptions=False)
    r = client.get("/v1/boom")
    err = error_of(r)
    assert r.status_code == 500 and err["code"] == "internal_error"
    assert "SECRET" not in r.text and "RuntimeError" not in r.text
    assert r.headers["x-request-id"] in err["message"]


# ---------------------------------------------------------------------------------------------- item 4
def test_item4_oversized_uploads_are_413_and_empty_ones_400(live: Live) -> None:
    big = b'{"a": 1}\n' * ((MAX_UPLOAD + 65536) // 9 + 1000)  # past the limit even with framing allowed for
    body, ctype = multipart(big)
    with live.http(ALICE) as http:
        by_length = http.post("/v1/files", content=body, headers={"content-type": ctype})
        by_chunks = http.post("/v1/files", content=chunked(body), headers={"content-type": ctype})
        just_over = http.post("/v1/files", content=chunked(multipart(b'{"a": 1}\n' * (MAX_UPLOAD // 9 + 10))[0]),
                              headers={"content-type": ctype})
    for r in (by_length, by_chunks, just_over):
        assert r.status_code == 413 and error_of(r)["code"] == "file_too_large", r.text
        assert error_of(r)["message"]
    assert "transfer-encoding" not in by_length.request.headers and by_chunks.request.headers["transfer-encoding"]
    for empty in (b"", b"\n  \n"):
        with pytest.raises(openai.BadRequestError) as e:
            live.client(ALICE).files.create(file=("empty.jsonl", empty), purpose="fine-tune")
        assert _body(e.value)["code"] == "invalid_file_format" and "empty" in _body(e.value)["message"]
    names = [f.filename for f in live.client(ALICE).files.list().data]
    assert "empty.jsonl" not in names  # nothing refused was stored


# ---------------------------------------------------------------------------------------------- item 5
@pytest.mark.parametrize(("change", "param", "why"), [
    ({"hyperparameters": {"learning_rate_multiplier": 1e9}}, "hyperparameters.learning_rate_multiplier", "(0, 10]"),
    ({"hyperparameters": {"learning_rate_multiplier": 1e300}}, "hyperparameters.learning_rate_multiplier", "diverges"),
    ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs", "valid integer"),
    ({"hyperparameters": {"batch_size": "8"}}, "hyperparameters.batch_size", "valid integer"),
    ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 1e6}}}}, "method.dpo.hyperparameters.beta", "(0, 10]"),
    ({"suffix": "caf\u00e9"}, "suffix", "ASCII"),
    ({"suffix": "a..b"}, "suffix", "no '..'"),
    ({"seed": True}, "seed", "valid integer"),
    ({"tunelab": {"target_modules": ["nonexistent_proj"]}}, "tunelab.target_modules", "q_proj"),
    ({"tunelab": {"max_seq_len": 100_000}}, "tunelab.max_seq_len", "context of 512"),
    ({"tunelab": {"packing": "yes"}}, "tunelab.packing", "valid boolean"),
    ({"tunelab": {"learning_rate": 0.5}}, "tunelab.learning_rate", "diverge"),
    ({"metadata": {"tunelab.lora_r": "0"}}, "tunelab.lora_r", "[1, 1024]"),
])
def test_item5_every_option_is_typed_and_bounded(live: Live, alice_file: str, change: dict[str, Any],
                                                  param: str, why: str) -> None:
    with pytest.raises(openai.BadRequestError) as e:
        live.client(ALICE).fine_tuning.jobs.create(model=BASE, training_file=alice_file,
                                                   extra_body=change)  # type: ignore[call-overload]
    body = _body(e.value)
    assert body["param"] == param, body
    assert why in body["message"], body  # the message says why


def test_item5_non_finite_numbers_and_loose_types_on_the_wire(live: Live, alice_file: str) -> None:
    with live.http(ALICE) as http:
        for raw in ('{"learning_rate_multiplier": Infinity}', '{"learning_rate_multiplier": NaN}',
                    '{"n_epochs": 1e400}'):
            r = http.post("/v1/fine_tuning/jobs", headers={"content-type": "application/json"},
                          content=f'{{"model": "{BASE}", "training_file": "{alice_file}", "hyperparameters": {raw}}}')
            assert r.status_code == 400 and error_of(r)["param"].startswith("hyperparameters."), r.text
        for change in ({"stream": "yes"}, {"n": True}, {"max_tokens": "4"}, {"temperature": "0.5"}):
            r = http.post("/v1/chat/completions", json={"model": BASE, "messages": USER, **change})
            assert r.status_code == 400 and error_of(r)["param"] == next(iter(change)), r.text
    # A valid module name passes the base-model check (then the job is cancelled at once).
    job = live.client(ALICE).fine_tuning.jobs.create(model=BASE, training_file=alice_file,
                                                     extra_body={"tunelab": {"target_modules": ["q_proj", "v_proj"],
                                                                             "max_steps": 1000}})
    assert live.client(ALICE).fine_tuning.jobs.cancel(job.id).status == "cancelled"


# ---------------------------------------------------------------------------------------------- item 6
def test_item6_per_owner_limits_are_429_and_leave_others_alone(live: Live, sec_env: dict[str, Path],
                                                               bob_file: str) -> None:
    carol = live.client(CAROL)
    with sec_env["train"].open("rb") as f:
        train = carol.files.create(file=f, purpose="fine-tune").id
    created = [carol.fine_tuning.jobs.create(model=BASE, training_file=train,
                                             extra_body={"tunelab": {"max_steps": 1000}}).id for _ in range(2)]
    try:
        with pytest.raises(openai.RateLimitError) as e:
            carol.fine_tuning.jobs.create(model=BASE, training_file=train)
        assert e.value.status_code == 429 and _body(e.value)["code"] == "rate_limit_exceeded"
        other = live.client(BOB).fine_tuning.jobs.create(model=BASE, training_file=bob_file,
                                                         extra_body={"tunelab": {"max_steps": 1000}})
        live.client(BOB).fine_tuning.jobs.cancel(other.id)  # bob was not held back by carol's jobs
    finally:
        for job_id in created:
            carol.fine_tuning.jobs.cancel(job_id)
    # Files: 5 per owner (carol has 1), then bytes: 200,000 per owner.
    small = [carol.files.create(file=(f"s{i}.jsonl", b'{"a": 1}\n'), purpose="fine-tune").id for i in range(4)]
    with pytest.raises(openai.RateLimitError) as e:
        carol.files.create(file=("one-too-many.jsonl", b'{"a": 1}\n'), purpose="fine-tune")
    assert _body(e.value)["code"] == "rate_limit_exceeded"
    for file_id in small:
        carol.files.delete(file_id)
    chunk = b'{"a": 1}\n' * 12_000  # 108,000 bytes
    carol.files.create(file=("big1.jsonl", chunk), purpose="fine-tune")
    with pytest.raises(openai.RateLimitError):
        carol.files.create(file=("big2.jsonl", chunk), purpose="fine-tune")
    live.client(BOB).files.create(file=("bob-big.jsonl", chunk), purpose="fine-tune")  # bob's quota is his own


def _queue(store: Store, owner: str, status: str = "queued") -> None:
    store.insert(jobs, id=new_id("ftjob-"), owner=owner, model="m", training_file="file-x", status=status,
                 created_at=0, seed=0, hyperparameters={}, method={}, options={}, result_files=[],
                 pause_requested=False, step=0, metrics_offset=0, last_train_step=0, last_valid_step=-1)


def test_item6_scheduling_is_round_robin_by_owner(tmp_path: Path) -> None:
    """Owner a queues 4 jobs before b and c queue one each: training takes a, b, c, a, a, a (not a, a, a, a,
    b, c); and an owner with a job running waits behind an owner with none, however old its job."""
    store = Store(f"sqlite:///{tmp_path / 'jobs.db'}")
    service = JobsService(store, JobsSettings(data_dir=tmp_path, base_model="m", served_names=("m",)))
    pool = WorkerPool(service, n_workers=2)
    for owner in ["a", "a", "a", "a", "b", "c"]:
        _queue(store, owner)
    order = []
    while (row := pool._claim()) is not None and len(order) < 10:
        order.append(row["owner"])
        store.update_job(row["id"], status="succeeded")
    assert order == ["a", "b", "c", "a", "a", "a"]

    _queue(store, "x", status="running")
    _queue(store, "x")
    _queue(store, "y")
    fresh = WorkerPool(service, n_workers=2)  # no turns taken yet: only the running count tells them apart
    claimed = [fresh._claim(), fresh._claim()]
    assert [r["owner"] for r in claimed if r is not None] == ["y", "x"]
    store.close()


# ---------------------------------------------------------------------------------------------- item 7
class _Payload:
    def __reduce__(self) -> Any:
        return (Path.touch, (Path(self.marker),))  # type: ignore[attr-defined]


def test_item7_checkpoints_hold_no_pickle_and_refuse_one(tmp_path: Path) -> None:
    """A checkpoint is safetensors + JSON and loads back to equal state; an old-style .pt planted in a data dir
    is read with weights_only and cannot run code. (Exact resume: tests/unit/test_training.py::
    test_resume_after_interruption_matches_uninterrupted and tests/integration/test_processes.py.)"""
    model = tiny_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95))
    sch = torch.optim.lr_scheduler.StepLR(opt, step_size=2)
    ids = torch.tensor([[1, 2, 3, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    sch.step()
    random.seed(3)
    np.random.seed(3)
    torch.manual_seed(3)
    saved_rng = ckpt.rng_state()
    path = ckpt.write_checkpoint(tmp_path, 1, model, opt, sch, {"step": 1}, "x: 1\n", "model", keep=2)
    assert not list(path.glob("*.pt")) and not list(path.glob("*.pkl"))
    for f in path.rglob("*"):
        if f.is_file():
            assert not f.read_bytes().startswith(b"\x80"), f"{f.name} is a pickle"
    state, opt_sd, sch_sd, rng = ckpt.load_checkpoint(path)
    assert state == {"step": 1} and sch_sd == sch.state_dict()
    want = opt.state_dict()
    assert opt_sd["param_groups"] == want["param_groups"]  # tuples (betas) and int keys come back as they were
    for k, v in want["state"][0].items():
        assert torch.equal(opt_sd["state"][0][k], v)
    assert torch.equal(rng["torch"], saved_rng["torch"]) and rng["python"] == saved_rng["python"]
    assert np.array_equal(rng["numpy"][1], saved_rng["numpy"][1])
    ckpt.set_rng_state(rng)  # restores as the loop does

    # An old-format checkpoint folder whose optimizer.pt carries code: refused, the code never runs.
    old = tmp_path / "old"
    old.mkdir()
    (old / "state.json").write_text("{}")
    payload = _Payload()
    payload.marker = str(tmp_path / "pwned")  # type: ignore[attr-defined]
    (old / "optimizer.pt").write_bytes(pickle.dumps({"state": payload}))
    with pytest.raises(pickle.UnpicklingError):
        ckpt.load_checkpoint(old)
    assert not (tmp_path / "pwned").exists()
    # ...while an honest old rng.pt (numpy state inside) still loads.
    torch.save(saved_rng, old / "rng.pt")
    assert ckpt._load_part(old, "rng")["python"] == saved_rng["python"]


# ---------------------------------------------------------------------------------------------- item 8
def test_item8_tools_are_refused_and_every_error_has_a_code(live: Live) -> None:
    # The tiny base's ChatML template has no tool support: tools are refused naming the template (issue 15).
    client = live.client(ALICE)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}
    for kwargs, param, code in (({"tools": [tool]}, "tools", "tools_not_supported"),
                                ({"tool_choice": "auto"}, "tool_choice", "invalid_value"),
                                ({"tools": [tool], "tool_choice": "required"}, "tools", "tools_not_supported")):
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model=BASE, messages=USER, max_tokens=4, **kwargs)  # type: ignore[call-overload]
        body = _body(e.value)
        assert body["param"] == param and body["code"] == code, body
        assert code != "tools_not_supported" or "has no tool support" in body["message"]
    with live.http(ALICE) as http:
        answers = [
            http.post("/v1/chat/completions", json={"model": BASE, "messages": USER, "stop": ["x"] * 5}),  # schema 400
            http.post("/v1/completions", json={"model": BASE, "prompt": "x" * 600, "max_tokens": 64}),  # engine 400
            http.post("/v1/completions", json={"model": BASE, "prompt": [10**9]}),  # engine 400: bad token id
            http.get("/v1/nothing-here"),  # 404 route
            http.delete("/v1/models"),  # 405
            http.post("/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}),
            http.get("/v1/files/file-not-mine"),
        ]
    assert [r.status_code for r in answers] == [400, 400, 400, 404, 405, 400, 404]
    for r in answers:
        assert error_of(r)["code"]


def test_principals_and_keys_file_admin_column(tmp_path: Path) -> None:
    from tunelab.errors import ConfigError
    from tunelab.server import load_admin_keys, load_api_keys

    f = tmp_path / "keys"
    f.write_text("sk-a alice\nsk-o ops admin\n")
    assert load_api_keys([], f, ["sk-x"]) == {"sk-a": "alice", "sk-o": "ops", "sk-x": "admin"}
    assert load_admin_keys(f, ["sk-x"]) == {"sk-o", "sk-x"}
    f.write_text("sk-a alice root\n")
    with pytest.raises(ConfigError, match="third field"):
        load_api_keys([], f)
