"""The python grader's worker: run with `python -I _pyworker.py MEMORY_BYTES PARENT_PID` by tunelab.graders.sandbox.

Stdlib only (it is started with -I, without tunelab on the path). Before the user's code runs it limits its own
address space, file size and core dumps (resource.setrlimit), moves fd 1 so the code's prints go to stderr,
and installs an audit hook (which cannot be removed) that refuses sockets, name lookups, new processes and
signals to other processes. Then: one JSON line with the source, answered {"ready": true} or {"error": ...};
then one JSON line per sample ({"sample", "item"}), each answered {"score": float} or {"error": text}.
"""

import json
import math
import os
import resource
import sys
import threading
import time
import traceback

BLOCKED = ("socket.", "subprocess.", "os.system", "os.exec", "os.posix_spawn", "os.spawn", "os.fork", "os.forkpty",
           "pty.spawn", "os.kill", "os.killpg", "signal.pthread_kill", "_posixsubprocess", "webbrowser.open")


def _audit(event, args):
    if event.startswith(BLOCKED):
        raise PermissionError(f"{event} is not allowed in a grader (no network, no processes)")


def _watch(parent):
    while True:  # a thread: it runs even while grade() loops, so an orphaned worker never outlives its job
        if os.getppid() != parent:
            os._exit(70)
        time.sleep(0.5)


def main():
    mem = int(sys.argv[1])
    threading.Thread(target=_watch, args=(int(sys.argv[2]),), daemon=True).start()
    resource.setrlimit(resource.RLIMIT_AS, (mem, mem))
    resource.setrlimit(resource.RLIMIT_FSIZE, (16 * 1024 * 1024, 16 * 1024 * 1024))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    proto_in = sys.stdin
    proto_out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # the user's prints must not reach the protocol pipe
    sys.stdout = sys.stderr

    def send(obj):
        proto_out.write(json.dumps(obj) + "\n")
        proto_out.flush()

    source = json.loads(proto_in.readline())["source"]
    sys.addaudithook(_audit)
    ns: dict = {"__name__": "grader"}
    try:
        exec(compile(source, "<grader source>", "exec"), ns)
        grade = ns["grade"]
    except BaseException as e:  # noqa: BLE001 - anything the user's code does is reported, never raised here
        send({"error": _last(e)})
        return
    send({"ready": True})
    for line in proto_in:
        req = json.loads(line)
        try:
            value = grade(req["sample"], req["item"])
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"grade() returned {type(value).__name__} {str(value)[:80]!r}, not a number")
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"grade() returned {value}")
            send({"score": value})
        except BaseException as e:  # noqa: BLE001
            send({"error": _last(e)})


def _last(e):
    tb = traceback.extract_tb(e.__traceback__)
    where = next((f"line {f.lineno}: " for f in reversed(tb) if f.filename == "<grader source>"), "")
    return f"{where}{type(e).__name__}: {e}"[:2000]


if __name__ == "__main__":
    main()
