"""Paths in a config file are relative to its folder, `--set` paths to the current directory, run folders to the
current directory; a missing data file is an error that names the config key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tunelab.config import dump_config, load_config
from tunelab.errors import ConfigError


def _project(root: Path) -> Path:
    """root/proj/config.yaml next to root/proj/data/{train,valid}.jsonl; returns the config path."""
    (root / "proj" / "data").mkdir(parents=True)
    for name in ("train.jsonl", "valid.jsonl", "test.jsonl", "general.jsonl"):
        (root / "proj" / "data" / name).write_text("{}\n")
    cfg = root / "proj" / "config.yaml"
    cfg.write_text("data:\n  train: data/train.jsonl\n  validation: ./data/valid.jsonl\n  test: data/../data/test.jsonl\n"
                   "  mix: {path: data/general.jsonl, fraction: 0.2}\n"
                   "eval: {general_data: data/general.jsonl}\noutput_dir: runs/x\n")
    return cfg


def test_config_paths_are_relative_to_its_folder_whatever_the_current_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = _project(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(cfg_path)
    data = tmp_path / "proj" / "data"
    assert cfg.data.train == str(data / "train.jsonl")
    assert cfg.data.validation == str(data / "valid.jsonl")
    assert cfg.data.test == str(data / "test.jsonl")  # normalised
    assert cfg.data.mix is not None and cfg.data.mix.path == str(data / "general.jsonl")
    assert cfg.eval.general_data == str(data / "general.jsonl")
    assert cfg.output_dir == "runs/x"  # run folders: relative to where you work, not to the config


def test_a_relative_config_path_from_a_relative_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert load_config(Path("proj/config.yaml")).data.train == str(tmp_path / "proj" / "data" / "train.jsonl")


def test_set_paths_are_relative_to_the_current_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = _project(tmp_path)
    here = tmp_path / "here"
    here.mkdir()
    (here / "mine.jsonl").write_text("{}\n")
    monkeypatch.chdir(here)
    cfg = load_config(cfg_path, ["data.train=mine.jsonl"])
    assert cfg.data.train == str(here / "mine.jsonl")
    assert cfg.data.validation == str(tmp_path / "proj" / "data" / "valid.jsonl")  # the file's own stay put
    cfg = load_config(cfg_path, ["data={train: mine.jsonl}"])  # a whole section set: the same rule
    assert cfg.data.train == str(here / "mine.jsonl") and cfg.data.validation is None


def test_missing_data_file_names_the_key_and_where_it_looked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = _project(tmp_path)
    (tmp_path / "proj" / "data" / "valid.jsonl").unlink()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        load_config(cfg_path)
    msg = e.value.message
    assert msg.startswith(f"{cfg_path}: data.validation: file not found: {tmp_path / 'proj' / 'data' / 'valid.jsonl'}")
    assert f"relative to its folder, {tmp_path / 'proj'}" in msg
    with pytest.raises(ConfigError, match=r"data\.test: file not found: .*nope\.jsonl \(--set paths are relative to the "
                                          r"current directory\)"):
        load_config(cfg_path, ["data.validation=null", "data.test=nope.jsonl"])
    with pytest.raises(ConfigError, match=r"data\.train: is a folder, not a file"):
        load_config(cfg_path, ["data.validation=null", "data.train=proj"])


def test_missing_file_through_the_cli_is_a_clean_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    cfg_path = _project(tmp_path)
    (tmp_path / "proj" / "data" / "train.jsonl").unlink()
    monkeypatch.chdir(tmp_path / "proj" / "data")
    with pytest.raises(SystemExit) as e:
        main(["train", str(cfg_path)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "data.train: file not found" in err and "Traceback" not in err


def test_the_pipeline_may_produce_the_training_file(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: clean.jsonl\n  pipeline:\n    input: raw.jsonl\n    output: clean.jsonl\n"
                 "    steps:\n      - contamination: {eval: test.jsonl}\n")
    cfg = load_config(p)
    assert cfg.data.pipeline is not None
    assert cfg.data.train == cfg.data.pipeline.output == str(tmp_path / "clean.jsonl")
    assert cfg.data.pipeline.input == str(tmp_path / "raw.jsonl")
    assert cfg.data.pipeline.steps[0].contamination.eval == str(tmp_path / "test.jsonl")


def test_model_name_is_a_path_only_when_it_is_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg_path = _project(tmp_path)
    (tmp_path / "proj" / "my-model").mkdir()
    body = cfg_path.read_text()
    monkeypatch.chdir(tmp_path)
    for name, want in (("my-model", str(tmp_path / "proj" / "my-model")),  # a folder next to the config
                       ("./not-yet", str(tmp_path / "proj" / "not-yet")),  # written as a path
                       ("HuggingFaceTB/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct"),  # hub id
                       ("smollm2-135m-instruct", "smollm2-135m-instruct"),  # built-in name
                       ("/abs/model", "/abs/model")):
        cfg_path.write_text(body + f"model: {{name: {name}}}\n")
        assert load_config(cfg_path).model.name == want, name
    assert load_config(cfg_path, ["model.name=proj/my-model"]).model.name == str(tmp_path / "proj" / "my-model")


def test_the_resolved_config_a_run_writes_loads_back_from_anywhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config(_project(tmp_path))
    run = tmp_path / "runs" / "x"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(dump_config(cfg))
    monkeypatch.chdir(tmp_path / "runs")
    again = load_config(run / "config.yaml", [f"output_dir={run}"])  # what `tunelab train --resume` does
    assert again.data == cfg.data and again.output_dir == str(run)


def test_eval_of_a_config_reads_its_test_file_relative_to_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tunelab.eval.run import plan

    cfg_path = _project(tmp_path)
    monkeypatch.chdir(tmp_path / "proj" / "data")
    p = plan(cfg_path)
    assert p.data == tmp_path / "proj" / "data" / "test.jsonl"
    assert os.path.isabs(p.run_config.data.train)
