"""The child process of a job: `python -m tunelab.jobs.child validate|train JOB_DIR`.

The only place in tunelab.jobs that imports torch (through tunelab.train). Usually started "warm" (no
JOB_DIR: it imports everything first, then reads the job folder from stdin). It talks to the server through
files in the job folder, never the database: `validate` writes validate.json; `train` runs
`tunelab.train.run.train(cfg, resume=True)` on JOB_DIR/config.yaml (metrics.jsonl and checkpoints land in
JOB_DIR/run, where the server's worker reads them) and writes result.json. A watchdog thread exits the child
when the server that started it dies, so a killed server never leaves an orphan training behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

FILE_PARAMS = {"train.jsonl": "training_file", "valid.jsonl": "validation_file"}
_TOKENIZERS: dict[tuple[str, str | None, bool], Any] = {}


def _watch_parent(parent: int) -> None:
    while True:
        if os.getppid() != parent:
            os._exit(75)  # the server is gone; its restart resumes this job from the last checkpoint
        time.sleep(0.5)


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _known_methods() -> set[str]:
    """Method names `tunelab train` knows."""
    from tunelab.train.run import METHODS

    return set(METHODS)


def _issue_text(issue: Any, label: str) -> str:
    where = label + (f", line {issue.line}" if issue.line is not None else "")
    if issue.field:
        where += f", field {issue.field}"
    return f"{where}: {issue.message}"


def openai_preference_to_tunelab(path: Path) -> bool:
    """OpenAI's DPO lines ({"input": {"messages": [...]}, "preferred_output": [...], "non_preferred_output":
    [...]}) become tunelab's preference lines ({"prompt", "chosen", "rejected"}), one for one, so the
    validator's line numbers still point into the uploaded file. Other lines are kept as they are. The file is
    replaced (never written through: it may be a hard link to the upload). Returns whether anything changed."""
    out, changed = [], False
    for raw in path.read_text(encoding="utf-8").splitlines():
        try:
            obj = json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError:
            obj = None
        if isinstance(obj, dict) and "input" in obj and ("preferred_output" in obj or "non_preferred_output" in obj):
            inp = obj["input"]
            prompt = inp.get("messages") if isinstance(inp, dict) else inp
            line = {"prompt": prompt, "chosen": obj.get("preferred_output"), "rejected": obj.get("non_preferred_output")}
            if isinstance(inp, dict):  # OpenAI allows tools in the DPO input; they travel with the pair
                line.update({k: inp[k] for k in ("tools", "parallel_tool_calls") if k in inp})
            raw = json.dumps(line, ensure_ascii=False)
            changed = True
        out.append(raw)
    if changed:
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("\n".join(out) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    return changed


def openai_rft_to_tunelab(path: Path, grader: dict[str, Any], label: str) -> dict[str, Any] | None:
    """OpenAI's reinforcement lines ({"messages": [...prompt...], ...extra fields}) become tunelab's
    conversation lines, one for one: the extra fields move to `<file>.items.jsonl` (the grader's `item`, line by
    line) and an empty assistant turn closes the prompt (GRPO samples it). Every `{{item.X}}` the grader reads
    must be in every line. Returns an error result naming the line and field, or None."""
    from tunelab.data.readers import TOP_KEYS
    from tunelab.graders import parse_grader
    from tunelab.graders.spec import item_fields
    from tunelab.graders.template import lookup

    needed = sorted(item_fields(parse_grader(grader, "method.reinforcement.grader")))
    out, items = [], []
    for n, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            obj = json.loads(raw) if raw.strip() else None
        except json.JSONDecodeError:
            obj = None
        item: dict[str, Any] = {}
        if isinstance(obj, dict) and isinstance(obj.get("messages"), list):
            item = {k: v for k, v in obj.items() if k not in TOP_KEYS["messages"]}
            for p in needed:
                if not lookup(item, p)[0]:
                    return {"ok": False, "code": f"invalid_{'training' if path.name == 'train.jsonl' else 'validation'}"
                            "_file", "param": FILE_PARAMS.get(path.name),
                            "message": f"{label}, line {n}, field {'.'.join(p)}: the grader reads "
                                       f"{{{{item.{'.'.join(p)}}}}}, which this line does not have"}
            msgs = obj["messages"]
            if not msgs or not isinstance(msgs[-1], dict) or msgs[-1].get("role") != "assistant":
                msgs = [*msgs, {"role": "assistant", "content": ""}]
            raw = json.dumps({"messages": msgs, **{k: obj[k] for k in obj if k in TOP_KEYS["messages"]
                                                   and k != "messages"}}, ensure_ascii=False)
        out.append(raw)
        items.append(json.dumps(item, ensure_ascii=False))
    for dest, lines in ((path, out), (path.with_suffix(".items.jsonl"), items)):
        tmp = dest.with_name(dest.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
        os.replace(tmp, dest)  # never written through: the data file may be a hard link to the upload
    return None


def validate(job_dir: Path) -> dict[str, Any]:
    """Validate the job's files with the base model's tokenizer, as `tunelab train` would."""
    from tunelab.config import load_config
    from tunelab.data.validate import validate_file
    from tunelab.model.loading import load_tokenizer, resolve_model

    spec = json.loads((job_dir / "spec.json").read_text())
    cfg = load_config(job_dir / "probe.yaml")
    if cfg.method != "sft" and cfg.method not in _known_methods():
        return {"ok": False, "code": "unsupported_method", "param": "method.type",
                "message": f"method {cfg.method!r} is not supported by this server yet"}
    expect = "preference" if cfg.method in ("dpo", "orpo", "simpo") else None
    key = (cfg.model.name, cfg.model.gguf_file, cfg.model.trust_remote_code)
    if key not in _TOKENIZERS:  # a warm validator serves many jobs on the same base
        _TOKENIZERS[key] = load_tokenizer(resolve_model(cfg.model.name, cfg.model.gguf_file), cfg.model.trust_remote_code)
    tok = _TOKENIZERS[key]
    out: dict[str, Any] = {"ok": True}
    for name, label in spec["files"].items():
        path = job_dir / "data" / name
        if expect == "preference":
            openai_preference_to_tunelab(path)
        if cfg.method == "grpo" and cfg.grpo is not None and cfg.grpo.grader is not None \
                and not path.with_suffix(".items.jsonl").exists():
            problem = openai_rft_to_tunelab(path, cfg.grpo.grader, label)
            if problem is not None:
                return problem
        is_train = name == "train.jsonl"
        # The job's own label rule and system prompt: trained_tokens must be what training will count.
        rep = validate_file(path, tok, cfg.data.max_seq_len, expect=expect,
                            min_examples=cfg.data.min_examples if is_train else 1, train_on=cfg.data.train_on,
                            system_prompt=cfg.data.system_prompt)
        if rep.errors:
            shown = [_issue_text(i, label) for i in rep.errors[:20]]
            more = f" (and {len(rep.errors) - 20} more)" if len(rep.errors) > 20 else ""
            kind = "training" if is_train else "validation"
            return {"ok": False, "code": f"invalid_{kind}_file", "param": FILE_PARAMS[name],
                    "message": f"invalid {kind} file: " + "; ".join(shown) + more}
        if is_train:
            out.update(n_examples=rep.examples, trained_tokens_per_epoch=rep.trained_tokens,
                       warnings=[_issue_text(i, label) for i in rep.warnings[:5]])
    return out


def weights_in(folder: Path) -> Path:
    """The trainable weights in a run or checkpoint folder (tunelab.rundir's rule); `model/` when there are none yet."""
    from tunelab.rundir import MODEL
    from tunelab.rundir import weights_in as found

    return found(folder) or folder / MODEL


def export_checkpoint(ckpt: Path, dest_root: Path) -> None:
    """Copy a checkpoint's weights (its `adapter`, or `model` for full fine-tuning) to
    JOB_DIR/checkpoints/step-N, atomically, as soon as it is written. The training loop keeps only its last
    few checkpoints; every exported one stays servable. Done here, in the training process before rotation,
    rather than by the server's poller, which a busy machine can make miss a checkpoint that lived only a few
    steps."""
    dest = dest_root / ckpt.name
    if dest.exists():
        return
    dest_root.mkdir(parents=True, exist_ok=True)
    tmp = dest_root / (".tmp-" + ckpt.name)
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(weights_in(ckpt), tmp)
    os.replace(tmp, dest)


def train_job(job_dir: Path) -> dict[str, Any]:
    from tunelab.config import load_config
    from tunelab.train.run import train

    cfg = load_config(job_dir / "config.yaml")
    result = train(cfg, resume=True, console=None, show_progress=False,
                   on_checkpoint=lambda ckpt: export_checkpoint(ckpt, job_dir / "checkpoints"))
    return {"ok": True, "tokens_seen": result.state.tokens_seen, "step": result.state.step,
            "final_valid": result.final_valid}


def _preload(mode: str) -> None:
    """Import what the work needs before any job arrives, so a warm child starts a job without the import
    cost (torch, transformers, peft: seconds; tens of seconds on a busy machine)."""
    # transformers and peft import lazily: name the classes so the real import work happens now.
    from transformers import AutoTokenizer, PreTrainedTokenizerFast  # noqa: F401

    import tunelab.data.validate  # noqa: F401
    import tunelab.model.loading  # noqa: F401

    if mode == "train":
        import accelerate  # noqa: F401
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot  # noqa: F401
        from peft import LoraConfig, PeftModel, get_peft_model  # noqa: F401
        from transformers import AutoModelForCausalLM  # noqa: F401

        import tunelab.train.run  # noqa: F401
        import tunelab.train.sft  # noqa: F401


def _redirect_output(log: Path) -> None:
    # A warm child learns its job only now: from here on its output belongs to that job's log.
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def run_one(mode: str, job_dir: Path) -> bool:
    from tunelab.errors import DataError, TunelabError

    out_file = job_dir / ("validate.json" if mode == "validate" else "result.json")
    t0 = time.perf_counter()
    try:
        result = validate(job_dir) if mode == "validate" else train_job(job_dir)
    except TunelabError as e:
        code = "invalid_training_file" if isinstance(e, DataError) else "training_failed"
        result = {"ok": False, "code": code, "param": "training_file" if code == "invalid_training_file" else None,
                  "message": e.message}
    except Exception as e:  # any crash becomes the job's error; the traceback stays in child.log
        traceback.print_exc()
        result = {"ok": False, "code": "internal_error", "param": None, "message": f"{type(e).__name__}: {e}"}
    result["seconds"] = round(time.perf_counter() - t0, 3)  # for the overhead benchmark: work vs. plumbing
    _write_json(out_file, result)
    return bool(result.get("ok"))


def main(argv: list[str]) -> int:
    """`validate|train JOB_DIR` runs one job. `validate|train` alone is a warm child: it preloads, then reads
    job folders from stdin, one per line (train: exactly one job, then exit; validate: until stdin closes),
    answering each with a line on stdout once its result file is written."""
    threading.Thread(target=_watch_parent, args=(os.getppid(),), daemon=True).start()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    mode = argv[0]
    if len(argv) > 1:
        return 0 if run_one(mode, Path(argv[1])) else 1
    answer = os.fdopen(os.dup(1), "w", buffering=1)  # kept: fds 1 and 2 move to each job's log
    _redirect_output(Path(os.devnull))  # library chatter while importing must not reach the answer pipe
    _preload(mode)
    for line in sys.stdin:
        job_dir = Path(line.strip())
        _redirect_output(job_dir / "child.log")
        ok = run_one(mode, job_dir)
        if mode == "train":
            return 0 if ok else 1
        answer.write("done\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
