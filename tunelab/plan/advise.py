"""`tunelab plan advise`: the guide's ladder run as an experiment on the user's own eval set.

1. prompting: the base model with the user's instructions, zero-shot;
2. retrieval: the k training examples most similar to each question (BM25, `bm25s`) put before it as earlier
   turns: the RAG-style baseline that needs no training;
3. constrained decoding: when the task has a JSON schema, the base model zero-shot with its output held to
   the schema (the server's `response_format: json_schema`), reported as the share of answers valid under it;
4. a short LoRA probe: `tunelab train` for a few steps on the training file.

Every option is scored by `tunelab eval`'s own code (tunelab.eval.run.evaluate on an EvalPlan), so the numbers
mean what they mean in an evaluation. The recommendation applies the guide's rules (see `recommend`).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunelab.data.readers import read_conversations
from tunelab.data.records import Conversation, Message
from tunelab.errors import ConfigError, TunelabError, read_yaml

Log = Callable[[str], None]
ANSWER_KEYS = {"data_changes": ("often", "sometimes", "rarely"), "calls_per_month": None, "target": None}


@dataclass(frozen=True)
class Answers:
    """What cannot be measured: how fast the data changes, call volume, and the score that counts as done."""

    data_changes: str | None = None
    calls_per_month: float | None = None
    target: float | None = None


def read_answers(path: str | Path) -> Answers:
    raw = read_yaml(path, "answers file", mapping=True)
    for k, v in raw.items():
        if k not in ANSWER_KEYS:
            raise ConfigError(f"{path}: unknown key {k!r} (expected {', '.join(ANSWER_KEYS)})")
        ok = ANSWER_KEYS[k]
        if ok is not None and v not in ok:
            raise ConfigError(f"{path}: {k}: expected one of {', '.join(ok)}, got {v!r}")
        if ok is None and not isinstance(v, (int, float)):
            raise ConfigError(f"{path}: {k}: expected a number, got {v!r}")
    t = raw.get("target")
    if t is not None and not 0 < t <= 1:
        raise ConfigError(f"{path}: target: a score in (0, 1], got {t}")
    return Answers(raw.get("data_changes"), raw.get("calls_per_month"), t)


def ask_answers(ask: Callable[[str, Any], Any]) -> Answers:
    """Interactive mode: `ask(question, default)` returns the typed answer."""
    changes = ""
    while changes not in ANSWER_KEYS["data_changes"]:  # type: ignore[operator]
        changes = str(ask("How often do the facts behind the answers change? (often/sometimes/rarely)", "rarely"))
    calls = float(ask("Calls per month (0 if unknown)", 0))
    target = float(ask("Score that counts as good enough, 0-1 (0: the best option measured)", 0))
    return Answers(changes, calls or None, target or None)


def _bm25_shots(train: list[Conversation], queries: list[Conversation], k: int) -> list[list[Conversation]]:
    import bm25s

    def text(c: Conversation) -> str:
        return "\n".join(m.content for m in c.prompt if m.role == "user")

    retriever = bm25s.BM25()
    retriever.index(bm25s.tokenize([text(c) for c in train], show_progress=False), show_progress=False)
    k = min(k, len(train))
    docs, _ = retriever.retrieve(bm25s.tokenize([text(q) for q in queries], show_progress=False), k=k,
                                 show_progress=False)
    return [[train[int(j)] for j in row] for row in docs]


def with_shots(c: Conversation, shots: list[Conversation]) -> Conversation:
    """The question preceded by retrieved examples as earlier user/assistant turns (most similar last)."""
    system = [m for m in c.messages if m.role in ("system", "developer")]
    rest = [m for m in c.messages if m.role not in ("system", "developer")]
    turns: list[Message] = []
    for s in reversed(shots):
        turns += [m for m in s.prompt if m.role == "user"] + [Message("assistant", s.completion)]
    return Conversation(messages=tuple(system + turns + rest), source=c.source)  # type: ignore[arg-type]


def _write_jsonl(path: Path, convs: list[Conversation]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for c in convs:
            f.write(json.dumps({"messages": [m.to_json() for m in c.messages]}, ensure_ascii=False) + "\n")


def primary_metric(convs: list[Conversation]) -> str:
    """json_valid when the references are JSON objects (a format task), else contains_answer (a fact task)."""
    def is_obj(s: str) -> bool:
        try:
            return isinstance(json.loads(s), dict)
        except ValueError:
            return False

    return "json_valid" if sum(is_obj(c.completion) for c in convs) * 2 > len(convs) else "contains_answer"


def recommend(rows: dict[str, dict[str, Any]], metric: str, answers: Answers) -> dict[str, Any]:
    """The guide's decision on the measured scores.

    - prompting reaching 85-90% of the target: don't fine-tune;
    - a knowledge gap (retrieved facts lift the score; the probe, trained on those facts, does not answer
      held-out questions about them): retrieval;
    - data that changes often: retrieval, which is refreshed by re-indexing, not re-training;
    - a behaviour gap (format, vocabulary, style: the probe reaches the target without the examples in every
      prompt): fine-tune.
    """
    p = rows["prompting"][metric]
    r = rows["retrieval"][metric]
    f = rows["fine-tune"][metric] if "fine-tune" in rows else None
    best = max(x for x in (p, r, f) if x is not None)
    target = answers.target or best or 1.0
    reasons: list[str] = []
    if best == 0:
        return {"choice": "none", "target": target, "reasons": [
            f"no option scores above 0 on {metric}: check the eval data and metric before choosing"]}
    if p >= 0.85 * target:
        reasons.append(f"prompting reaches {p:.0%} against a target of {target:.0%} (>= 85%): the remaining gap "
                       "rarely justifies fine-tuning; improve the prompt instead")
        return {"choice": "prompting", "target": target, "reasons": reasons}
    # Facts: the retrieved examples carry the answer, and training on them did not teach held-out questions.
    knowledge = r - p >= 0.2 and (f is None or r >= f + 0.2)
    if knowledge:
        reasons.append(f"a knowledge gap: retrieved examples lift {metric} from {p:.0%} to {r:.0%}, "
                       + ("while the fine-tuning probe, trained on the same facts, reaches only "
                          f"{f:.0%} on held-out questions: facts are better injected at query time"
                          if f is not None else "without any training"))
    if answers.data_changes == "often" and r >= 0.85 * target:
        reasons.append("the data changes often: a retrieval index is refreshed, a fine-tuned model is re-trained")
        knowledge = True
    if knowledge:
        return {"choice": "retrieval", "target": target, "reasons": reasons}
    # Behaviour: the probe closes the gap by itself; retrieval can only do it with examples in every prompt.
    if f is not None and f >= 0.85 * target:
        tok_r = rows["retrieval"]["prompt_tokens"]
        tok_f = rows["fine-tune"]["prompt_tokens"]
        reasons.append(f"a behaviour gap: prompting gives {p:.0%} {metric}, the short fine-tuning probe {f:.0%}; "
                       "format, vocabulary and style are burned in at weight level"
                       + (f", with {tok_r - tok_f:.0f} fewer prompt tokens per call than retrieval's examples"
                          if tok_r > tok_f else ""))
        if answers.calls_per_month:
            saved = (tok_r - tok_f) * answers.calls_per_month
            reasons.append(f"at {answers.calls_per_month:,.0f} calls a month that is {saved:,.0f} input tokens a "
                           "month (see `tunelab plan cost`)")
        return {"choice": "fine-tune", "target": target, "reasons": reasons}
    choice = "retrieval" if r >= (f or 0) else "fine-tune"
    reasons.append(f"no option reaches 85% of the target; {choice} measures best ({max(r, f or 0):.0%}); "
                   "more data or a longer run may change this")
    return {"choice": choice, "target": target, "reasons": reasons}


def _prompt_tokens(tok: Any, convs: list[Conversation], system_prompt: str | None) -> float:
    from tunelab.eval.generate import prompt_ids

    return sum(len(prompt_ids(tok, c, system_prompt)) for c in convs) / max(len(convs), 1)


def advise(
    config: str | Path, data: str | Path, *, train: str | Path | None = None, system_prompt: str | None = None,
    answers: Answers = Answers(), k: int = 3, probe_steps: int = 30, max_examples: int | None = None,
    max_new_tokens: int | None = None, metric: str | None = None, workdir: str | Path | None = None,
    log: Log = lambda s: None,
) -> dict[str, Any]:
    from tunelab.eval.run import EvalPlan, Target, _load_base, evaluate, plan

    p = plan(config, data=data, system_prompt=system_prompt)
    cfg = p.run_config
    train_path = Path(train) if train else Path(cfg.data.train)
    if not train_path.is_file():
        raise ConfigError(f"{train_path}: training file not found (give --train TRAIN.jsonl)")
    train_convs = [c for c in read_conversations(train_path) if c.prompt and c.completion]
    if not train_convs:
        raise TunelabError(f"{train_path}: no examples with a prompt and an assistant answer", 1)
    gen = p.eval_config.generation
    if max_new_tokens:
        gen = gen.model_copy(update={"max_new_tokens": max_new_tokens})
    ev = p.eval_config.model_copy(update={"forgetting": False, "generation": gen,
                                          "max_examples": max_examples or p.eval_config.max_examples})
    from tunelab.eval.run import load_eval_data

    evals = load_eval_data(p.data, ev.max_examples)
    metric = metric or primary_metric(evals)
    if metric not in ev.metrics:
        ev = ev.model_copy(update={"metrics": [*ev.metrics, metric]})
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="tunelab-advise-"))
    work.mkdir(parents=True, exist_ok=True)
    sp = p.targets[0].system_prompt
    base = Target("base", "base", sp)
    log(f"loading {cfg.model.name}")
    model, tok = _load_base(cfg)
    rows: dict[str, dict[str, Any]] = {}
    results: dict[str, Any] = {}

    def run(name: str, data_path: Path, target: Target, m: Any, convs: list[Conversation], train_s: float) -> Any:
        t0 = time.time()
        res = evaluate(EvalPlan(cfg, ev, p.config_dir, data_path, [target]), log=log, models=(m, tok))
        secs = time.time() - t0
        agg = res["targets"][0]["metrics"]
        rows[name] = {**{k2: agg.get(k2) for k2 in res["metrics"]}, metric: agg.get(metric) or 0.0,
                      "prompt_tokens": _prompt_tokens(tok, convs, target.system_prompt),
                      "latency_s": secs / max(len(convs), 1), "training_s": train_s}
        results[name] = res
        return res

    log("[prompting] zero-shot")
    run("prompting", p.data, base, model, evals, 0.0)
    log(f"[retrieval] {k} BM25 neighbours from {train_path} per question")
    shots = _bm25_shots(train_convs, evals, k)
    aug = [with_shots(c, s) for c, s in zip(evals, shots, strict=True)]
    aug_path = work / "retrieval-eval.jsonl"
    _write_jsonl(aug_path, aug)
    run("retrieval", aug_path, base, model, aug, 0.0)
    schema = ev.resolved_schema(p.config_dir)
    constrained = (_constrained_rung(model, tok, evals, schema, sp, ev.generation.max_new_tokens, log)
                   if schema is not None else {"available": False, "reason": "the task has no eval.json_schema"})
    if probe_steps > 0:
        log(f"[fine-tune] LoRA probe: {probe_steps} steps on {train_path}")
        run_dir, train_s = _probe(cfg, train_path, probe_steps, work / "probe")
        from tunelab.eval.run import _attach

        t = Target("fine-tune probe", "run", cfg.data.system_prompt, run_dir=run_dir, adapter=run_dir / "adapter")
        tuned = _attach(model, t, "probe")
        run("fine-tune", p.data, t, tuned, evals, train_s)
    rec = recommend(rows, metric, answers)
    return {"kind": "tunelab-advice", "version": 1, "model": cfg.model.name, "data": str(p.data),
            "train": str(train_path), "n_examples": len(evals), "metric": metric, "k": k,
            "probe_steps": probe_steps, "options": rows, "constrained_decoding": constrained,
            "answers": answers.__dict__, "recommendation": rec,
            "examples": _examples(results, evals)}


def _constrained_rung(model: Any, tok: Any, evals: list[Conversation], schema: dict[str, Any],
                      system_prompt: str | None, max_new_tokens: int, log: Log) -> dict[str, Any]:
    """Rung 3: zero-shot answers decoded under the schema (llguidance masks); the share that validate."""
    import jsonschema

    from tunelab.data.templates import encode_prompt
    from tunelab.engine.sync import sample
    from tunelab.engine.types import Constraint, SamplingParams

    log("[constrained decoding] zero-shot, output held to eval.json_schema")
    t0 = time.time()
    prompts = [encode_prompt(tok, list(c.prompt), system_prompt) for c in evals]
    sp = SamplingParams(max_new_tokens, temperature=0.0, constraint=Constraint("json", schema=json.dumps(schema)))
    outs = sample(model, tok, prompts, sp)
    valid = 0
    for o in outs:
        try:
            jsonschema.validate(json.loads(o.text), schema)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass  # an answer cut at max_new_tokens is not valid JSON
    share = valid / max(len(outs), 1)
    return {"available": True, "schema_valid": share, "latency_s": (time.time() - t0) / max(len(outs), 1),
            "reason": f"{share:.0%} of zero-shot answers valid under eval.json_schema with constrained decoding "
                      "(serve with response_format json_schema to get it)"}


def _examples(results: dict[str, Any], evals: list[Conversation], n: int = 3) -> list[dict[str, Any]]:
    out = []
    for j, c in enumerate(evals[:n]):
        out.append({"prompt": c.prompt[-1].content, "reference": c.completion,
                    "outputs": {name: next(iter(r["examples"][j]["outputs"].values())) for name, r in results.items()}})
    return out


def _probe(cfg: Any, train_path: Path, steps: int, out: Path) -> tuple[Path, float]:
    """A short LoRA run through `tunelab train` (no validation, no checkpoints); returns its folder and seconds."""
    from tunelab.config import config_from_dict
    from tunelab.train.run import train as run_train

    raw = cfg.model_dump(mode="json")
    raw["finetune"] = "lora" if cfg.finetune in ("full", "qlora") else cfg.finetune
    raw["method"] = "sft"
    raw["data"] = {**raw["data"], "train": str(train_path), "validation": None, "validation_fraction": 0.0,
                   "test": None, "mix": None, "pipeline": None, "check_contamination": False}
    raw["train"] = {**raw["train"], "max_steps": steps, "eval_every": None, "save_every": None,
                    "early_stopping": False}
    raw["eval"] = {**raw["eval"], "baseline": False}
    raw["output_dir"] = str(out)
    probe_cfg = config_from_dict(raw, "advise probe")
    t0 = time.time()
    res = run_train(probe_cfg, overwrite=True, console=None, show_progress=False)
    return res.run_dir, time.time() - t0
