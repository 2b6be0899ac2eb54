"""Every preference method through the real `train()` entry point on a tiny Llama: held-out preference
accuracy rises; DPO's reference costs no second model copy with adapters; precomputed reference log-probs
train exactly like the live reference; a reward model saves, loads and scores through the CLI."""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import pytest
import torch

from tunelab.config import config_from_dict
from tunelab.data.readers import read_preferences
from tunelab.train import run as run_mod
from tunelab.train.pref_data import resource
from tunelab.train.run import train
from tunelab.train.tracking import read_metrics


def subset(src: Path, dst: Path, n: int) -> Path:
    dst.write_text("".join(src.read_text().splitlines(keepends=True)[:n]))
    return dst


def make_cfg(tmp_path: Path, model_dir: Path, method: str, out: str | None = None, **sections: Any) -> Any:
    kind = "kto" if method == "kto" else "pairs"
    raw: dict[str, Any] = {
        "model": {"name": str(model_dir), "dtype": "fp32"},
        "method": method,
        "finetune": "lora",
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "data": {"train": str(subset(resource(f"{kind}_train"), tmp_path / f"{kind}_train.jsonl", 24)),
                 "validation": str(subset(resource(f"{kind}_eval"), tmp_path / f"{kind}_eval.jsonl", 12)),
                 "max_seq_len": 160, "min_examples": 1},
        "train": {"max_steps": 6, "batch_size": 4, "lr": 5e-3, "warmup_ratio": 0.0, "seed": 3, "eval_every": 6},
        "output_dir": str(tmp_path / (out or method)),
    }
    for k, v in sections.items():
        if isinstance(v, dict):
            raw.setdefault(k, {}).update(v)
        else:
            raw[k] = v
    return config_from_dict(raw)


def valid_rows(run_dir: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(run_dir) if "valid_loss" in r]


@pytest.mark.parametrize("method", ["dpo", "orpo", "simpo", "kto", "reward"])
def test_method_raises_heldout_preference_accuracy(tmp_path: Path, tiny_dir: Path, method: str) -> None:
    res = train(make_cfg(tmp_path, tiny_dir, method), show_progress=False)
    rows = valid_rows(res.run_dir)
    before, after = rows[0], rows[-1]
    assert before.get("baseline") and after["step"] == 6
    assert after["valid_accuracy"] > before["valid_accuracy"], (before, after)
    assert after["valid_accuracy"] >= 0.75
    assert after["valid_loss"] < before["valid_loss"]


def test_kto_pairwise_accuracy_on_heldout_pairs(tmp_path: Path, tiny_dir: Path) -> None:
    """KTO never sees pairs; its implicit reward (log pi - log ref) still ranks held-out pairs correctly."""
    from tunelab.model.adapters import load_for_inference
    from tunelab.train.dpo import Reference, preference_accuracy

    cfg = make_cfg(tmp_path, tiny_dir, "kto", data={"validation": None}, train={"max_steps": 6})
    res = train(cfg, show_progress=False)
    model, tok, _ = load_for_inference(str(res.run_dir))
    pairs = read_preferences(resource("pairs_eval"))[:12]
    acc = preference_accuracy(model, tok, cfg, pairs, ref=Reference(model))
    assert acc >= 0.75


def test_precomputed_reference_trains_like_live_reference(tmp_path: Path, tiny_dir: Path) -> None:
    short: dict[str, Any] = {"data": {"validation": None}, "train": {"max_steps": 3}}
    live = train(make_cfg(tmp_path, tiny_dir, "dpo", "live", **short), show_progress=False)
    pre = train(make_cfg(tmp_path, tiny_dir, "dpo", "pre", dpo={"precompute_ref": True}, **short), show_progress=False)
    a = [r["train_loss"] for r in read_metrics(live.run_dir) if "train_loss" in r]
    b = [r["train_loss"] for r in read_metrics(pre.run_dir) if "train_loss" in r]
    assert a == pytest.approx(b, abs=1e-5)


def _weight_bytes() -> int:
    """Bytes of every distinct parameter storage alive in the process (what a second model copy would add)."""
    seen: dict[int, int] = {}
    for o in gc.get_objects():
        if isinstance(o, torch.nn.Parameter) and o.device.type == "cpu":
            seen[o.untyped_storage().data_ptr()] = o.untyped_storage().nbytes()
    return sum(seen.values())


def _peak_weights_during(cfg: Any, monkeypatch: pytest.MonkeyPatch) -> int:
    seen: list[int] = []
    real = run_mod.run_loop

    def measured(ctx: Any, progress: Any = None) -> Any:
        out = real(ctx, progress)
        seen.append(_weight_bytes())  # after setup and training: any reference copy is still alive here
        return out

    monkeypatch.setattr(run_mod, "run_loop", measured)
    train(cfg, show_progress=False)
    return seen[0]


def test_dpo_with_adapters_keeps_one_model_copy(tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    short = {"max_steps": 1}
    gc.collect()
    sft_cfg = config_from_dict({
        "model": {"name": str(tiny_dir), "dtype": "fp32"}, "lora": {"r": 8, "dropout": 0.0},
        "data": {"train": str(tmp_path / "sft.jsonl"), "max_seq_len": 160, "min_examples": 1},
        "train": {"max_steps": 1, "batch_size": 4}, "output_dir": str(tmp_path / "sft")})
    rows = [json.loads(x) for x in resource("pairs_train").read_text().splitlines()[:8]]
    (tmp_path / "sft.jsonl").write_text("".join(
        json.dumps({"prompt": r["prompt"], "completion": r["chosen"]}) + "\n" for r in rows))
    sft = _peak_weights_during(sft_cfg, monkeypatch)
    gc.collect()
    no_valid = {"validation": None}
    dpo = _peak_weights_during(make_cfg(tmp_path, tiny_dir, "dpo", "dpo_lora", train=short, data=no_valid), monkeypatch)
    gc.collect()
    full = _peak_weights_during(make_cfg(tmp_path, tiny_dir, "dpo", "dpo_full", finetune="full", train=short,
                                         data=no_valid), monkeypatch)
    assert dpo <= sft * 1.02, (sft, dpo)  # the reference is the same weights with adapters off
    # The probe does see a copy when there is one: full fine-tuning keeps a frozen reference (~2x the base).
    assert full >= dpo * 1.6, (dpo, full)


def test_reward_model_saves_loads_and_scores(tmp_path: Path, tiny_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tunelab.cli import main
    from tunelab.train.reward import RewardModel

    cfg = make_cfg(tmp_path, tiny_dir, "reward", data={"validation": None}, train={"max_steps": 8})
    res = train(cfg, show_progress=False)
    rm = RewardModel.load(res.run_dir)
    pairs = read_preferences(resource("pairs_eval"))[:12]
    chosen = rm.score([p.prompt for p in pairs], [p.chosen[-1].content for p in pairs])
    rejected = rm.score([p.prompt for p in pairs], [p.rejected[-1].content for p in pairs])
    assert sum(c > r for c, r in zip(chosen, rejected, strict=True)) >= 9
    with pytest.raises(SystemExit) as e:
        main(["reward", "score", str(res.run_dir), "--data", str(tmp_path / "pairs_eval.jsonl"), "--json"])
    assert e.value.code in (0, None)
    out = json.loads(capsys.readouterr().out)
    assert len(out["rows"]) == 12 and out["accuracy"] >= 0.75
    assert out["rows"][0]["chosen"] == pytest.approx(chosen[0], abs=1e-4)
    with pytest.raises(SystemExit) as e:
        main(["reward", "score", str(tmp_path / "nope"), "--prompt", "x", "--response", "y"])
    assert e.value.code == 2


@pytest.mark.parametrize("method", ["reward", "dpo"])
def test_interrupted_run_resumes_to_the_same_weights(tmp_path: Path, tiny_dir: Path, monkeypatch: Any, method: str) -> None:
    """The reward head lives outside the adapter: it is checkpointed and restored with it."""
    from safetensors.torch import load_file

    from tunelab.train import loop as loop_mod

    settings = {"data": {"validation": None}, "train": {"max_steps": 6, "save_every": 3}}
    straight = train(make_cfg(tmp_path, tiny_dir, method, out="straight", **settings), show_progress=False)
    cfg = make_cfg(tmp_path, tiny_dir, method, out="broken", **settings)
    real = loop_mod.train_step

    def crash(ctx: Any, mbs: Any) -> Any:
        if ctx.state.step == 4:
            raise KeyboardInterrupt
        return real(ctx, mbs)

    monkeypatch.setattr(loop_mod, "train_step", crash)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, show_progress=False)
    monkeypatch.setattr(loop_mod, "train_step", real)
    resumed = train(cfg, resume=True, show_progress=False)
    a = load_file(str(straight.run_dir / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(resumed.run_dir / "adapter" / "adapter_model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    if method == "reward":
        ha = load_file(str(straight.run_dir / "value_head.safetensors"))
        hb = load_file(str(resumed.run_dir / "value_head.safetensors"))
        assert all(torch.allclose(ha[k], hb[k], atol=1e-6) for k in ha)


@pytest.mark.parametrize("method", ["dpo", "orpo", "kto"])
def test_chunked_head_trains_like_whole_logits(tmp_path: Path, tiny_dir: Path, method: str) -> None:
    """`train.loss_chunk` (the preference methods' log-probs by chunks of the LM head, the default) against
    the whole logits (0): the same seeded run gives the same losses and validation metrics."""
    runs = {c: train(make_cfg(tmp_path, tiny_dir, method, f"{method}{c}", train={"loss_chunk": c, "max_steps": 3}),
                     show_progress=False) for c in (0, 5)}
    a, b = ([float(r["train_loss"]) for r in read_metrics(runs[c].run_dir) if "train_loss" in r] for c in (0, 5))
    assert len(a) == 3 and a == pytest.approx(b, rel=1e-4)
    va, vb = valid_rows(runs[0].run_dir)[-1], valid_rows(runs[5].run_dir)[-1]
    assert va["valid_loss"] == pytest.approx(vb["valid_loss"], rel=1e-4)
    assert va["valid_accuracy"] == vb["valid_accuracy"]
