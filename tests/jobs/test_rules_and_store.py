"""Fast, in-process checks: the "auto" rules, request -> RunConfig, tunelab option validation, the result CSV,
and the store's keyset pagination (no server, no torch)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.jobs import hyper
from tunelab.jobs.harvest import Cursor, read_metrics, result_csv
from tunelab.jobs.service import check_jsonl, model_owner, safe_filename
from tunelab.jobs.store import Store, jobs, new_id
from tunelab.server.errors import APIError


@pytest.mark.parametrize(("n", "epochs"), [(1, 25), (10, 10), (20, 5), (34, 3), (1000, 3), (8334, 2),
                                           (10_000, 2), (30_000, 1)])
def test_auto_epochs_follows_openais_rule(n: int, epochs: int) -> None:
    assert hyper.auto_epochs(n) == epochs


def test_auto_batch_size_and_exact_micro_batch_split() -> None:
    assert [hyper.auto_batch_size(n) for n in (10, 499, 1000, 5000, 10**6)] == [1, 1, 2, 10, 256]
    assert hyper.split_batch(12, 8) == (6, 2)
    assert hyper.split_batch(7, 4) == (1, 7)  # prime: accumulate single examples, never change the batch
    assert hyper.split_batch(256, 8) == (8, 32)


def _req(**kw: object) -> hyper.JobCreate:
    return hyper.JobCreate.model_validate({"model": "m", "training_file": "file-x", **kw})


def test_build_config_resolves_auto_and_applies_overrides_in_order() -> None:
    req = _req(hyperparameters={"n_epochs": "auto", "batch_size": 16, "learning_rate_multiplier": 0.5},
               metadata={"tunelab.lora_r": "4", "team": "x"}, tunelab={"finetune": "qlora", "max_steps": 9})
    cfg, resolved = hyper.build_config(base_model="base", train_path="t.jsonl", valid_path="v.jsonl",
                                       output_dir="out", req=req, n_examples=50,
                                       server_sets=[("train.max_steps", 100), ("lora.alpha", 8)])
    assert resolved == {"n_epochs": 3, "batch_size": 16, "learning_rate_multiplier": 0.5}
    assert (cfg.train.batch_size, cfg.train.grad_accum) == (8, 2)
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.finetune == "qlora"
    assert cfg.lora.r == 4 and cfg.lora.alpha == 8  # metadata option, server override
    assert cfg.train.max_steps == 9  # the job's option beats the server's --set
    assert cfg.train.save_every == 3 and cfg.train.eval_every == 3  # ceil(9 / 4), validation at checkpoints
    assert cfg.data.validation == "v.jsonl" and cfg.model.name == "base"


def test_method_hyperparameters_win_and_dpo_beta() -> None:
    req = _req(hyperparameters={"n_epochs": 2},
               method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 4, "beta": 0.3}}})
    cfg, resolved = hyper.build_config(base_model="b", train_path="t", valid_path=None, output_dir="o", req=req,
                                       n_examples=100)
    assert cfg.method == "dpo" and cfg.dpo.beta == 0.3 and resolved["n_epochs"] == 4 and resolved["beta"] == 0.3


@pytest.mark.parametrize(("kw", "param"), [
    ({"metadata": {"tunelab.max_steps": "0"}}, "tunelab.max_steps"),
    ({"metadata": {"tunelab.finetune": "magic"}}, "tunelab.finetune"),
    ({"method": {"type": "reinforcement"}}, "method.reinforcement"),  # it needs its grader
])
def test_bad_options_name_their_parameter(kw: dict[str, object], param: str) -> None:
    with pytest.raises(hyper.OptionError) as e:
        hyper.build_config(base_model="b", train_path="t", valid_path=None, output_dir="o", req=_req(**kw),
                           n_examples=10)
    assert e.value.param == param


def test_request_schema_limits() -> None:
    with pytest.raises(ValueError, match=r"must be in \[1, 50\]"):
        _req(hyperparameters={"n_epochs": 0})
    with pytest.raises(ValueError, match="lora_rank"):  # extra_body options: unknown names refused at once
        _req(tunelab={"lora_rank": 8})
    with pytest.raises(ValueError, match="letters"):
        _req(suffix="a:b")
    with pytest.raises(ValueError, match="16 keys"):
        _req(metadata={str(i): "v" for i in range(17)})


def test_names_are_sanitised() -> None:
    assert safe_filename("../../etc/passwd") == "passwd"
    assert safe_filename("C:\\Users\\me\\train.jsonl") == "train.jsonl"
    assert safe_filename("") == "upload"
    assert model_owner("key-ab12:x y") == "key-ab12-x-y"


def test_check_jsonl_names_the_line(tmp_path: Path) -> None:
    p = tmp_path / "f.jsonl"
    p.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(APIError, match="line 3: expected a JSON object"):
        check_jsonl(p, "f.jsonl")


def test_result_csv_dedupes_resumed_steps(tmp_path: Path) -> None:
    m = tmp_path / "metrics.jsonl"
    m.write_text('{"step": 0, "baseline": true, "valid_loss": 3}\n'
                 '{"step": 1, "train_loss": 2.5, "train_token_acc": 0.1}\n'
                 '{"step": 2, "train_loss": 2.0, "train_token_acc": 0.2}\n'
                 '{"step": 2, "valid_loss": 2.2, "valid_token_acc": 0.3}\n'
                 '{"step": 2, "train_loss": 1.9, "train_token_acc": 0.25}\n')  # repeated after a resume
    assert result_csv(m).decode().splitlines() == [
        "step,train_loss,train_accuracy,valid_loss,valid_mean_token_accuracy", "1,2.5,0.1,,", "2,1.9,0.25,2.2,0.3"]


def test_store_pages_by_owner_with_has_more(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'db.sqlite'}")
    ids = []
    for i in range(25):
        job_id = new_id("ftjob-")
        ids.append(job_id)
        store.insert(jobs, id=job_id, owner="a" if i % 5 else "b", model="m", training_file="f", status="queued",
                     created_at=i, seed=1, hyperparameters={}, method={}, options={}, result_files=[],
                     pause_requested=False, step=0, metrics_offset=0, last_train_step=0, last_valid_step=-1)
    mine = [j for i, j in enumerate(ids) if i % 5][::-1]
    seen, after, more = [], None, True
    while more:
        rows, more = store.page(jobs, where=[jobs.c.owner == "a"], after=after, limit=7)
        seen += [r["id"] for r in rows]
        after = rows[-1]["id"] if rows else None
    assert seen == mine
    # someone else's id as a cursor yields nothing rather than a peek into their rows
    assert store.page(jobs, where=[jobs.c.owner == "a"], after=ids[0], limit=5) == ([], False)
    assert store.update_job(ids[1], only_if_status=("running",), status="failed") is False
    assert store.update_job(ids[1], only_if_status=("queued",), status="running") is True


def test_the_jobs_server_side_imports_no_torch() -> None:
    import subprocess
    import sys

    code = ("import sys, tunelab.jobs.app, tunelab.jobs.routes, tunelab.jobs.workers; "
            "print('torch' in sys.modules, 'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


def _lines(*rows: dict[str, object]) -> str:
    import json

    return "".join(json.dumps(r) + "\n" for r in rows)


def test_read_metrics_is_incremental_merges_validation_and_skips_repeated_steps(tmp_path: Path) -> None:
    m = tmp_path / "metrics.jsonl"
    kw = dict(total=4, has_valid=True, eval_every=2)
    m.write_text(_lines({"step": 0, "baseline": True, "valid_loss": 3.0},
                        {"step": 1, "train_loss": 2.5, "train_token_acc": 0.1},
                        {"step": 2, "train_loss": 2.0, "train_token_acc": 0.2}) + '{"step": 2, "valid_lo')
    events, cur = read_metrics(m, Cursor(), final=False, **kw)  # type: ignore[arg-type]
    # step 2 is an evaluation step: its event waits for the validation line (still half written)
    assert [e.message for e in events] == ["Baseline (before training): validation loss=3.0000",
                                           "Step 1/4: training loss=2.5000"]
    assert (cur.last_train, cur.last_valid) == (1, 0)
    with m.open("a") as f:
        f.write('ss": 2.2, "valid_token_acc": 0.3}\n')
    events, cur = read_metrics(m, cur, final=False, **kw)  # type: ignore[arg-type]
    assert [e.message for e in events] == ["Step 2/4: training loss=2.0000, validation loss=2.2000"]
    assert events[0].type == "metrics" and events[0].data is not None
    assert events[0].data["valid_loss"] == 2.2 and events[0].data["train_mean_token_accuracy"] == 0.2
    assert cur.offset == m.stat().st_size
    # killed at step 4 before its validation, resumed from the step-2 checkpoint: 3 and 4 are logged again
    with m.open("a") as f:
        f.write(_lines({"step": 3, "train_loss": 1.8}, {"step": 4, "train_loss": 1.7},
                       {"step": 3, "train_loss": 1.81}, {"step": 4, "train_loss": 1.69},
                       {"step": 4, "valid_loss": 1.9}))
    events, cur = read_metrics(m, cur, final=False, **kw)  # type: ignore[arg-type]
    assert [e.message for e in events] == ["Step 3/4: training loss=1.8000", "Step 4/4: training loss=1.7000",
                                           "Step 4/4: validation loss=1.9000"]
    assert (cur.last_train, cur.last_valid, cur.offset) == (4, 4, m.stat().st_size)
    assert read_metrics(m, cur, final=True, **kw) == ([], cur)  # type: ignore[arg-type]


def test_schema_and_paging_query_compile_for_postgresql() -> None:
    """No PostgreSQL server here: check at least that the schema and the queries are portable SQL."""
    from sqlalchemy import select
    from sqlalchemy.dialects import postgresql
    from sqlalchemy.schema import CreateIndex, CreateTable

    from tunelab.jobs.store import metadata

    dialect = postgresql.dialect()
    ddl = [str(CreateTable(t).compile(dialect=dialect)) for t in metadata.sorted_tables]
    ddl += [str(CreateIndex(i).compile(dialect=dialect)) for t in metadata.sorted_tables for i in t.indexes]
    assert any("CREATE TABLE jobs" in d and "JSON" in d and "BOOLEAN" in d for d in ddl)
    q = select(jobs).where(jobs.c.owner == "a", jobs.c.seq < 5).order_by(jobs.c.seq.desc()).limit(21)
    assert "ORDER BY jobs.seq DESC" in str(q.compile(dialect=dialect))
