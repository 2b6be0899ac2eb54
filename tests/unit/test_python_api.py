"""The public Python API: every example in docs/python.md runs as written (on the tiny model), the exports are
exactly the documented ones, and `import tunelab` does not import torch."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import tunelab

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "python.md"


def _blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)


def _env() -> dict[str, str]:
    # This checkout first, whatever the test runner's PYTHONPATH; no hub access; a small share of the CPUs.
    return {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}


def test_import_tunelab_does_not_import_torch() -> None:
    code = ("import sys, tunelab; assert 'torch' not in sys.modules, 'torch imported';"
            "tunelab.load_config, tunelab.RunDir, tunelab.train; assert 'torch' not in sys.modules, 'torch by names';"
            "print('ok')")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=_env(), timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == "ok", p.stderr[-2000:]


def test_exports_are_the_documented_api() -> None:
    documented = set(re.findall(r"^\| `tunelab\.(\w+)", DOC.read_text(), flags=re.M))
    documented |= {"RunDir"}  # listed on the `tunelab.RunConfig`, `tunelab.RunDir` row
    assert set(tunelab.__all__) == documented
    for name in tunelab.__all__:
        assert getattr(tunelab, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        tunelab.nope  # noqa: B018


def test_train_stays_callable_after_its_package_is_imported() -> None:
    import tunelab.train.run  # binds the package to tunelab.train, as any training import does

    assert callable(tunelab.train) and tunelab.train is sys.modules["tunelab.train"]
    assert tunelab.train.run.train is not None  # still the package: its modules are reachable


def test_every_docs_example_runs(tmp_path: Path, tiny_dir: Path) -> None:
    from tunelab.starter import init_project

    blocks = _blocks()
    assert len(blocks) == 6
    # The docs' setup step (`tunelab init demo proj`), then the tiny model in place of SmolLM2 for speed.
    cfg = init_project("demo", tmp_path / "proj").config
    cfg.write_text(cfg.read_text().replace("name: smollm2-135m-instruct", f"name: {tiny_dir}"))
    driver = tmp_path / "examples.py"
    driver.write_text("".join(f"print('--- example {i}', flush=True)\nexec({b!r}, {{}})\n" for i, b in enumerate(blocks)))
    p = subprocess.run([sys.executable, str(driver)], cwd=tmp_path, capture_output=True, text=True, env=_env(),
                       timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    out = p.stdout
    assert "lora 16 2" in out and str(tmp_path / "proj" / "data" / "clinical" / "train.jsonl") in out
    assert "runs/first ['adapter', 'config.yaml', 'loss.png']" in out
    assert (tmp_path / "runs" / "first" / "eval" / "results.json").is_file()
    assert re.search(r"^base [0-9.]+\nfirst [0-9.]+$", out, flags=re.M), out
    assert "'clinical'" in out and out.rstrip().count("--- example") == 6
    assert "serving clinical@1 None" in out
