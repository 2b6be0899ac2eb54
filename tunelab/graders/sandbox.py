"""Running a `python` grader's code: in its own process, never in the caller's (the server or the trainer).

One worker process per grader (tunelab/graders/_pyworker.py under `python -I`), started once and fed one
sample at a time over a pipe, so a training step pays the interpreter start once, not per completion. Limits:
  * time: each `grade()` call must answer within `timeout_s` (wall clock) or the worker's process group is
    killed and the call raises GraderError naming the grader (and
    the worker exits by itself if its parent dies);
  * memory: RLIMIT_AS of `memory_mb` in the worker (a MemoryError inside grade() is reported as its error);
  * network: the worker runs in a fresh network namespace (`unshare -rn`: only a downed loopback) where this
    system permits unprivileged user namespaces, and always under an audit hook that refuses sockets, name
    lookups and new processes (the hook is Python-level; native code through ctypes is stopped only by the
    namespace). `network_isolation()` says which applies here.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import time
from functools import cache
from pathlib import Path
from typing import IO, Any

from tunelab.graders.spec import GraderError

WORKER = Path(__file__).with_name("_pyworker.py")
STARTUP_S = 30.0  # interpreter start on a busy machine, before the user's own time limit applies


@cache
def network_isolation() -> str:
    """"namespace+audit-hook" where `unshare -rn` works here, else "audit-hook"."""
    exe = shutil.which("unshare")
    if exe:
        try:
            if subprocess.run([exe, "-rn", "true"], capture_output=True, timeout=10).returncode == 0:
                return "namespace+audit-hook"
        except (OSError, subprocess.TimeoutExpired):
            pass
    return "audit-hook"


class PythonSandbox:
    def __init__(self, name: str, source: str, *, timeout_s: float = 10.0, memory_mb: int = 1024) -> None:
        self.name, self.source, self.timeout_s, self.memory_mb = name, source, timeout_s, memory_mb
        self.proc: subprocess.Popen[bytes] | None = None
        self._buf = b""
        self._err: IO[bytes] | None = None
        self._cwd: tempfile.TemporaryDirectory[str] | None = None

    # ------------------------------------------------------------------------------------------ lifecycle
    def _start(self) -> subprocess.Popen[bytes]:
        prefix = ["unshare", "-rn"] if network_isolation().startswith("namespace") else []
        self._cwd = tempfile.TemporaryDirectory(prefix="tunelab-grader-")
        self._err = tempfile.TemporaryFile()
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": self._cwd.name, "LANG": "C.UTF-8",
               "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        proc = subprocess.Popen([*prefix, sys.executable, "-I", str(WORKER), str(self.memory_mb * 1024 * 1024), str(os.getpid())],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, cwd=self._cwd.name,
                                env=env)  # in the caller's process group: killing a job's group kills it too
        self.proc, self._buf = proc, b""
        self._send({"source": self.source})
        reply = self._recv(STARTUP_S + self.timeout_s, "loading its source")
        if "error" in reply:
            self.close()
            raise GraderError(f"python grader {self.name!r}: its source failed to load: {reply['error']}")
        return proc

    def close(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()  # it can start no processes of its own
            proc.wait(timeout=30)
        if proc is not None:
            for f in (proc.stdin, proc.stdout):
                if f is not None:
                    f.close()
        if self._err is not None:
            self._err.close()
            self._err = None
        if self._cwd is not None:
            self._cwd.cleanup()
            self._cwd = None

    def __enter__(self) -> PythonSandbox:
        return self

    def __exit__(self, *_: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ protocol
    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        try:
            self.proc.stdin.write((json.dumps(obj) + "\n").encode())
            self.proc.stdin.flush()
        except OSError:
            pass  # it died: _recv reports how

    def _stderr_tail(self) -> str:
        if self._err is None:
            return ""
        self._err.seek(0, os.SEEK_END)
        size = self._err.tell()
        self._err.seek(max(0, size - 600))
        tail = self._err.read().decode(errors="replace").strip()
        return f"; its output ended: {tail}" if tail else ""

    def _recv(self, timeout: float, doing: str) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                self.close()
                raise GraderError(f"python grader {self.name!r} did not finish {doing} within {timeout:g}s "
                                  "(its time limit); the grader process was killed")
            ready, _, _ = select.select([fd], [], [], min(left, 1.0))
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self.proc.wait(timeout=30)
                    why = (" (killed: over its memory limit or a signal)" if code < 0 else f" (exit code {code})")
                    tail = self._stderr_tail()
                    self.close()
                    raise GraderError(f"python grader {self.name!r} died while {doing}{why}{tail}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        reply: dict[str, Any] = json.loads(line)
        return reply

    def grade(self, sample: dict[str, Any], item: dict[str, Any]) -> float:
        """The score of one sample; GraderError on a time-out, a crash or an exception inside grade()."""
        if self.proc is None or self.proc.poll() is not None:
            self._start()
        self._send({"sample": sample, "item": item})
        reply = self._recv(self.timeout_s, "grade()")
        if "error" in reply:
            raise GraderError(f"python grader {self.name!r}: grade() failed: {reply['error']}")
        return float(reply["score"])
