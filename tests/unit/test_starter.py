"""`tunelab init [TEMPLATE] DIR`: every shipped config can be started from, with its bundled data copied next to
it; existing work is never overwritten silently."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.config import load_config
from tunelab.errors import TunelabError
from tunelab.resources import config_names, resource
from tunelab.starter import init_project


@pytest.mark.parametrize("template", config_names())
def test_every_template_starts_a_folder_whose_config_loads_from_anywhere(
        template: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = init_project(template, tmp_path / "proj")
    assert res.config == tmp_path / "proj" / f"{template}.yaml"
    monkeypatch.chdir(tmp_path)
    cfg = load_config(res.config)
    for f in (cfg.data.train, cfg.data.validation, cfg.data.test, cfg.data.mix.path if cfg.data.mix else None):
        if f:  # the copies, not the package's files
            assert Path(f).is_relative_to(tmp_path / "proj" / "data"), f
            bundled = resource(*Path(f).relative_to(tmp_path / "proj" / "data").parts)
            assert Path(f).read_bytes() == bundled.read_bytes()
    assert "../" not in res.config.read_text()


def test_demo_is_the_default_and_keeps_the_comments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    with pytest.raises(SystemExit) as e:
        main(["init", str(tmp_path / "p")])
    assert e.value.code == 0
    text = (tmp_path / "p" / "demo_clinical_lora.yaml").read_text()
    assert "train: data/clinical/train.jsonl" in text and "test: data/clinical/test.jsonl" in text
    assert text.startswith("# The main job")
    out = capsys.readouterr().out
    assert f"next: tunelab train {tmp_path / 'p' / 'demo_clinical_lora.yaml'}" in out
    assert sorted(p.name for p in (tmp_path / "p" / "data" / "clinical").iterdir()) == [
        "test.jsonl", "train.jsonl", "validation.jsonl"]


def test_existing_work_is_kept_unless_forced(tmp_path: Path) -> None:
    init_project("dpo", tmp_path)
    again = init_project("dpo", tmp_path)  # same content: nothing rewritten
    assert again.written == [] and len(again.unchanged) == 3
    cfg = tmp_path / "dpo.yaml"
    cfg.write_text(cfg.read_text() + "# my edit\n")
    with pytest.raises(TunelabError, match="dpo.yaml exists and differs.*--force"):
        init_project("dpo", tmp_path)
    assert cfg.read_text().endswith("# my edit\n")
    init_project("dpo", tmp_path, force=True)
    assert not cfg.read_text().endswith("# my edit\n")


def test_bad_usage_is_a_clean_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main

    for args, expect in ((["init", "nope", str(tmp_path)], "no example config named 'nope' (known: demo,"),
                         (["init"], "usage: tunelab init [TEMPLATE] DIR"),
                         (["init", "a", "b", "c"], "usage: tunelab init [TEMPLATE] DIR")):
        with pytest.raises(SystemExit) as e:
            main(args)
        assert e.value.code == 2 and expect in capsys.readouterr().err
    (tmp_path / "f").write_text("x")
    with pytest.raises(TunelabError, match="not a folder"):
        init_project("dpo", tmp_path / "f")
    with pytest.raises(SystemExit):
        main(["init", "--list"])
    assert "demo_clinical_lora (or demo)" in capsys.readouterr().out


def test_main_registers_the_commands_once_per_process() -> None:
    """Calling `main()` again (tests, library users) must not add every command again: the tree stayed the
    same size, and building it stayed cheap, instead of growing with each call."""
    import pytest as _pytest

    from tunelab import cli

    for _ in range(3):
        with _pytest.raises(SystemExit):
            cli.main(["--help"])
    names = [c.name for c in cli.app.registered_commands]
    groups = [g.name for g in cli.app.registered_groups]
    assert len(names) == len(set(names)) and len(groups) == len(set(groups)), (names, groups)
