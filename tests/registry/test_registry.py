"""The model registry on its three storages: SQLite (default), PostgreSQL (a real server started here) and MLflow's
Model Registry (the real `mlflow` package on a local sqlite tracking store). Runs are real tiny-model trainings."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
import tiny

from tunelab.registry import Registry, RegistryError, parse_ref, parse_split
from tunelab.registry.sql import SQLBackend


def _train(root: Path, name: str, lr: float, model_dir: Path) -> Path:
    from tunelab.config import config_from_dict
    from tunelab.train.run import train

    data = root / f"{name}.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i} {name}"}]}
            for i in range(12)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = config_from_dict({"model": {"name": str(model_dir)}, "finetune": "lora",
                            "data": {"train": str(data), "min_examples": 1, "check_contamination": False},
                            "train": {"max_steps": 2, "batch_size": 4, "lr": lr}, "eval": {"baseline": False},
                            "output_dir": str(root / name)})
    train(cfg, overwrite=True, show_progress=False)
    return root / name


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("runs")
    model_dir = tiny.save_tiny(root / "tiny")
    return _train(root, "run-a", 2e-4, model_dir), _train(root, "run-b", 1e-3, model_dir)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A throwaway PostgreSQL server on 127.0.0.1 (the OS's postgresql package), run as the `postgres` user."""
    bindir = next((Path(p) for p in ("/usr/lib/postgresql/15/bin", "/usr/local/bin") if (Path(p) / "initdb").exists()),
                  None)
    if bindir is None or shutil.which("runuser") is None:
        pytest.skip("PostgreSQL server binaries (Debian package postgresql) are not installed")
    try:
        import psycopg  # noqa: F401
    except ImportError:
        pytest.skip("psycopg is not installed")
    # Not under pytest's tmp dir: that is private to root, and the server runs as the `postgres` user.
    d = Path(tempfile.mkdtemp(prefix="tunelab-pg-"))
    data = d / "data"
    os.chmod(d, 0o777)
    user = "postgres" if os.geteuid() == 0 else None
    run = (lambda *a: ["runuser", "-u", user, "--", *a]) if user else (lambda *a: list(a))
    subprocess.run(run(str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "tunelab"), check=True,
                   capture_output=True)
    port = _free_port()
    subprocess.run(run(str(bindir / "pg_ctl"), "-D", str(data), "-l", str(d / "log"), "-w", "-o",
                       f"-c listen_addresses=127.0.0.1 -p {port} -k {d}", "start"), check=True, capture_output=True)
    try:
        yield f"postgresql+psycopg://tunelab@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(run(str(bindir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"), capture_output=True)
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    # One tracking store for the module: creating its schema is the slow part (names differ per test).
    return f"mlflow:sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(params=["sqlite", "postgresql", "mlflow"])
def reg(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Registry]:
    spec = request.getfixturevalue("mlflow_uri") if request.param == "mlflow" else None
    if request.param == "postgresql":
        spec = request.getfixturevalue("postgres_url")
    r = Registry.open(tmp_path / "data", spec)
    yield r
    r.close()


def test_add_keeps_weights_and_lineage(reg: Registry, runs: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = runs
    name = f"notes-{tmp_path.name[-6:]}"  # PostgreSQL's database is shared by the module's tests
    v1 = reg.add(name, a)
    v2 = reg.add(name, b)
    assert (v1.version, v2.version) == (1, 2)
    assert v1.kind == "adapter" and Path(v1.weights_dir, "adapter_model.safetensors").is_file()
    assert Path(v1.path, "tokenizer", "tokenizer.json").is_file() and Path(v1.path, "config.yaml").is_file()
    manifest = json.loads((a / "manifest.json").read_text())
    assert v1.lineage["config_sha256"] == manifest["config_sha256"]
    assert v1.lineage["data"]["train"] == manifest["data"]["train"]["sha256"]
    assert v1.lineage["base_model"].endswith("tiny") and len(v1.lineage["base_weights_sha256"]) == 64
    assert v1.lineage["parent"] is None and v2.lineage["parent"] == 1
    assert v1.lineage["weights_sha256"] != v2.lineage["weights_sha256"]
    assert v1.metrics["step"] == 2
    # the version is the registry's copy: the run can go away
    assert reg.get(name, 1).to_dict() == v1.to_dict()
    assert [v.version for v in reg.versions(name)] == [1, 2] and name in reg.names()


def test_aliases_promote_rollback_and_remove(reg: Registry, runs: tuple[Path, Path], tmp_path: Path) -> None:
    name = f"m-{tmp_path.name[-6:]}"
    for run in runs:
        reg.add(name, run)
    with pytest.raises(RegistryError, match="no alias 'production'"):
        reg.resolve(name)
    reg.promote(name, 1, by="alice")
    assert reg.resolve(name).version == 1
    reg.promote(name, 2, by="bob")
    assert reg.resolve(name).version == 2 and reg.resolve(f"{name}@production").version == 2
    reg.alias(name, "staging", 1)
    assert reg.resolve(f"{name}@staging").version == 1 and reg.resolve(f"{name}@2").version == 2
    back = reg.rollback(name)
    assert back.split == {1: 1.0} and reg.resolve(name).version == 1
    hist = reg.history(name, "production")
    assert [(h["by"], h["action"]) for h in hist][:2] == [("alice", "promote"), ("bob", "promote")]
    assert hist[-1]["action"] == "rollback" and all(h["at"] > 0 for h in hist)
    with pytest.raises(RegistryError, match="still the target") as e:
        reg.remove(name, 1)
    assert e.value.status == 409
    reg.remove(name, 2)  # no alias points at 2 any more
    assert [v.version for v in reg.versions(name)] == [1]
    with pytest.raises(RegistryError, match="no such version") as e:
        reg.resolve(f"{name}@2")
    assert e.value.status == 404
    with pytest.raises(RegistryError, match="no version 7"):
        reg.alias(name, "staging", 7)


def test_split_is_weighted_and_sticky_per_user(reg: Registry, runs: tuple[Path, Path], tmp_path: Path) -> None:
    name = f"ab-{tmp_path.name[-6:]}"
    for run in runs:
        reg.add(name, run)
    reg.route(name, "production", parse_split("1=90,2=10"))
    assert reg.aliases(name)[0].split == {1: 0.9, 2: 0.1}
    # The pick is the same code on every storage; 2,000 users cost MLflow ~40 s, so the spread is checked on one.
    n = 2000 if isinstance(reg.backend, SQLBackend) and "sqlite" in reg.backend.url else 100
    picks = Counter(reg.resolve(name, user=f"user-{i}").version for i in range(n))
    assert 0.86 < picks[1] / n < 0.94 if n == 2000 else set(picks) <= {1, 2}, picks
    assert {reg.resolve(name, user="user-7").version for _ in range(20)} == {reg.resolve(name, user="user-7").version}


def test_diff_shows_config_data_and_metrics(reg: Registry, runs: tuple[Path, Path], tmp_path: Path) -> None:
    name = f"d-{tmp_path.name[-6:]}"
    for run in runs:
        reg.add(name, run)
    d = reg.diff(f"{name}@1", f"{name}@2")
    assert d["config"]["train.lr"] == [2e-4, 1e-3]
    assert "train" in d["data"] and "weights_sha256" in d["lineage"]
    assert "model.name" not in d["config"]  # same base on both sides


def test_refs_and_names_are_checked() -> None:
    assert parse_ref("m@3").version == 3 and parse_ref("m@staging").alias == "staging" and parse_ref("m").version is None
    for bad in ("../etc", "a/b", "ü", "", "m@0", "m@-x"):
        with pytest.raises(RegistryError):
            parse_ref(bad)
    for bad in ("1=0", "1=90,1=10", "x=1", "1=inf"):
        with pytest.raises(RegistryError):
            parse_split(bad)
    assert parse_split("1=3,2=1") == {1: 0.75, 2: 0.25}


def test_cli_flow(runs: tuple[Path, Path], tmp_path: Path) -> None:
    env = {**os.environ, "XDG_DATA_HOME": str(tmp_path / "xdg")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        import sys

        return subprocess.run([sys.executable, "-m", "tunelab.cli", "registry", *args], capture_output=True,
                              text=True, env=env, timeout=120)

    # The CLI is a thin layer over Registry (tested above); these check its wiring, output and errors.
    reg = Registry.open(tmp_path / "xdg" / "tunelab")
    reg.add("notes", runs[0])
    reg.close()
    assert cli("add", "notes", str(runs[1])).returncode == 0
    p = cli("route", "notes", "production", "--split", "1=90,2=10")
    assert p.returncode == 0 and "1=90%" in p.stdout
    p = cli("remove", "notes@1")
    assert p.returncode == 1 and "still the target" in p.stderr and "Traceback" not in p.stderr
    p = cli("add", "../x", str(tmp_path))
    assert p.returncode == 1 and "not allowed" in p.stderr
    assert (tmp_path / "xdg" / "tunelab" / "registry" / "local" / "notes" / "v2" / "adapter").is_dir()
    reg = Registry.open(tmp_path / "xdg" / "tunelab")
    assert [a.split for a in reg.aliases("notes")] == [{1: 0.9, 2: 0.1}]
