"""What you evaluated is what you serve: for a run trained here (tiny model, a few steps), the greedy text for
the same prompt is identical through `tunelab generate` (piped, so byte for byte), `tunelab eval` and
`tunelab serve` queried with the official `openai` client. All three go through the engine's batching loop,
the chat template's end-of-turn stop rule and the same decoding."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import tiny

from tunelab.config import config_from_dict
from tunelab.train.run import train

PROMPTS = ["echo red cat 1", "echo moon fish 2"]
MAX_TOKENS = 24


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-c", "from tunelab.cli import main; main()", *args], env=env,
                          capture_output=True, timeout=300, check=False)


def test_generate_eval_and_serve_agree(tmp_path: Path, tiny_dir: Path) -> None:
    import openai

    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from test_live_openai import start_serve, stop

    rows = tiny.chat_rows(24)
    test_rows = [{"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": "x"}]}
                 for p in PROMPTS]
    cfg = config_from_dict({
        "model": {"name": str(tiny_dir), "dtype": "fp32"},
        "finetune": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(tiny.write_jsonl(tmp_path / "train.jsonl", rows)),
                 "test": str(tiny.write_jsonl(tmp_path / "test.jsonl", test_rows)), "max_seq_len": 128,
                 "min_examples": 1},
        "train": {"max_steps": 12, "batch_size": 4, "lr": 1e-2, "warmup_ratio": 0.0, "seed": 5},
        "eval": {"generation": {"max_new_tokens": MAX_TOKENS}, "forgetting": False},
        "output_dir": str(tmp_path / "run"),
    })
    run_dir = train(cfg).run_dir

    # tunelab generate, piped: stdout is the model's text and nothing else.
    piped = []
    for p in PROMPTS:
        res = cli("generate", str(run_dir), "--prompt", p, "--max-tokens", str(MAX_TOKENS))
        assert res.returncode == 0, res.stderr.decode()
        piped.append(res.stdout.decode("utf-8"))
    res = cli("generate", str(run_dir), "--prompt", PROMPTS[0], "--max-tokens", str(MAX_TOKENS), "--json")
    obj = json.loads(res.stdout)
    assert obj["choices"][0]["text"] == piped[0]
    assert obj["usage"]["total_tokens"] == obj["usage"]["prompt_tokens"] + obj["usage"]["completion_tokens"] > 0

    # tunelab eval
    out = tmp_path / "results.json"
    res = cli("eval", str(run_dir), "--out", str(out))
    assert res.returncode == 0, res.stderr.decode()
    results = json.loads(out.read_text())
    run_name = next(t["name"] for t in results["targets"] if t["kind"] == "run")
    evaluated = [ex["outputs"][run_name] for ex in results["examples"]]

    # tunelab serve + the openai client
    server = start_serve(["--model", str(tiny_dir), "--adapter", f"mine={run_dir / 'adapter'}", "--dtype", "fp32"])
    try:
        client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0, timeout=120)
        served = [client.chat.completions.create(model="mine", messages=[{"role": "user", "content": p}],
                                                 max_tokens=MAX_TOKENS, temperature=0).choices[0].message.content
                  for p in PROMPTS]
    finally:
        stop(server)

    assert any(t for t in piped)  # the trained run says something
    assert piped == evaluated == served
