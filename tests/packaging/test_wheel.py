"""The wheel works on its own: built from a copy of the sources, installed into a fresh venv outside the repo,
and used from a temporary folder: --help, data validate on bundled data, init, a 2-step train on the tiny model.

Installing torch & co. again would take minutes and GBs, so the fresh venv gets the wheel with --no-deps and
the project venv's site-packages through a .pth path line. A path line is added to sys.path, but .pth files
inside that folder are not run, so the project's editable install is not active there: the test checks that
`tunelab` is imported from the fresh venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: int = 300) -> str:
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{cmd}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p.stdout


def test_wheel_installs_and_runs_outside_the_repo(tmp_path: Path, tiny_dir: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="2", TOKENIZERS_PARALLELISM="false")
    # Build from a clean copy: a stale build/ folder in the checkout could put deleted files in the wheel.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "tunelab", src / "tunelab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(tmp_path / "dist")], src, env)
    (wheel,) = (tmp_path / "dist").glob("tunelab-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "tunelab/resources/configs/demo_clinical_lora.yaml" in names
    assert "tunelab/resources/clinical/train.jsonl" in names and "tunelab/py.typed" in names
    assert not [n for n in names if n.startswith(("tests/", "runs/", "bench/")) or "/runs/" in n], names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", str(venv)], tmp_path, env)
    py = venv / "bin" / "python"
    site = Path(_run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "-q", "--no-deps", "--no-index", str(wheel)],
         tmp_path, env)
    (site / "_project_deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "work"
    work.mkdir()
    where = _run([str(py), "-c", "import tunelab; print(tunelab.__file__)"], work, env).strip()
    assert Path(where).is_relative_to(venv), where

    tl = str(venv / "bin" / "tunelab")
    assert "init" in _run([tl, "--help"], work, env)
    bundled = _run([str(py), "-c", "from tunelab.resources import resource; print(resource('clinical', 'train.jsonl'))"],
                   work, env).strip()
    assert Path(bundled).is_relative_to(venv)
    assert "400" in _run([tl, "data", "validate", bundled, "--model", str(tiny_dir)], work, env)
    _run([tl, "init", "demo", "proj"], work, env)
    out = _run([tl, "train", "proj/demo_clinical_lora.yaml", "--set", f"model.name={tiny_dir}",
                "--set", "train.max_steps=2", "--set", "train.eval_every=2", "--set", "data.check_contamination=false",
                "--set", "train.eval_max_examples=4", "--set", "output_dir=runs/pkg"], work, env, timeout=600)
    assert "done: 2 steps" in out, out
    assert (work / "runs" / "pkg" / "adapter" / "adapter_model.safetensors").is_file()
