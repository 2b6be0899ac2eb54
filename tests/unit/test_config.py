"""Every shipped YAML parses against the code; unknown keys and bad values fail early with a clear message."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from tunelab.config import load_config
from tunelab.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "tunelab" / "resources" / "configs").glob("*.yaml"))


def test_there_are_configs() -> None:
    assert len(CONFIGS) >= 5


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_parses(path: Path) -> None:
    cfg = load_config(path)  # also checks that every data file it names exists
    for f in (cfg.data.train, cfg.data.validation, cfg.data.test):
        if f:
            assert Path(f).is_absolute() and Path(f).is_relative_to(ROOT / "tunelab" / "resources"), f


def test_unknown_key_names_it_and_suggests(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: x.jsonl}\ntrain: {learning_rate: 1.0e-4, batchsize: 4}\nfinetune: lora\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = e.value.message
    assert "train.learning_rate: unknown key" in msg
    assert "train.batchsize: unknown key (did you mean 'batch_size'?)" in msg


def test_bad_values_and_overrides(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: x.jsonl}\n")
    (tmp_path / "x.jsonl").touch()
    with pytest.raises(ConfigError, match="finetune"):
        load_config(p, ["finetune=lorax"])
    with pytest.raises(ConfigError, match="lora.r"):
        load_config(p, ["lora.r=0"])
    cfg = load_config(p, ["train.lr=5e-4", "lora.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == 5e-4 and cfg.lora.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="key=value"):
        load_config(p, ["train.lr"])
    # sharding is for full fine-tuning with SFT; anything else is refused up front, saying what to do
    assert load_config(p, ["finetune=full", "train.fsdp=true"]).train.fsdp
    with pytest.raises(ConfigError, match="drop train.fsdp"):
        load_config(p, ["train.fsdp=true"])
    with pytest.raises(ConfigError, match="supports method sft"):
        load_config(p, ["finetune=full", "train.fsdp=true", "method=dpo"])


def test_config_is_frozen(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data: {train: x.jsonl}\n")
    (tmp_path / "x.jsonl").touch()
    cfg = load_config(p)
    with pytest.raises(ValidationError):
        cfg.train.lr = 1.0  # type: ignore[misc]


def test_data_pipeline_section_in_a_training_config(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: clean.jsonl\n  pipeline:\n    input: raw.jsonl\n    output: clean.jsonl\n"
                 "    steps:\n      - dedup: {threshold: 0.8}\n      - scrub: {}\n")
    cfg = load_config(p)
    assert cfg.data.pipeline is not None and [s.name for s in cfg.data.pipeline.steps] == ["dedup", "scrub"]


def test_accelerate_fsdp_or_deepspeed_launch_is_refused_with_the_way_out() -> None:
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from tunelab.train import fsdp

    with pytest.raises(ConfigError, match="set train.fsdp: true"):
        fsdp.check_supported(SimpleNamespace(distributed_type=DistributedType.FSDP))
    with pytest.raises(ConfigError, match="DeepSpeed"):
        fsdp.check_supported(SimpleNamespace(distributed_type=DistributedType.DEEPSPEED))
    fsdp.check_supported(SimpleNamespace(distributed_type=DistributedType.MULTI_CPU))  # DDP: fine
    # evaluation keeps shards in step: 5 examples, 2 processes, batch 2 -> 3 and 2 examples, 2 and 1 batches
    assert [fsdp.extra_eval_batches(5, 2, 2, mine) for mine in (3, 2)] == [0, 1]


def test_one_error_formatter_for_every_section(tmp_path: Path) -> None:
    """The run config, its eval: section and its data.pipeline steps all name the dotted key and the nearest one."""
    from tunelab.eval.config import eval_config_from_dict

    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: x.jsonl\n  pipeline:\n    input: a.jsonl\n    output: b.jsonl\n"
                 "    steps:\n      - dedup: {treshold: 0.5}\neval:\n  metrix: [bleu]\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert "data.pipeline.steps.0.dedup.treshold: unknown key (did you mean 'threshold'?)" in msg
    assert "eval.metrix: unknown key (did you mean 'metrics'?)" in msg
    with pytest.raises(ConfigError, match=r"eval\.generation\.max_new_tokenz: unknown key \(did you mean 'max_new_tokens'"):
        eval_config_from_dict({"generation": {"max_new_tokenz": 3}}, "e.yaml")


def test_qlora_states_paged_adamw_in_the_resolved_config(tmp_path: Path) -> None:
    p = tmp_path / "c.yaml"
    (tmp_path / "x.jsonl").write_text("")  # a config's data files must exist (relative to its folder)
    p.write_text("finetune: qlora\ndata: {train: x.jsonl}\n")
    assert load_config(p).train.optimizer == "paged_adamw"
    assert load_config(p, ["train.optimizer=adamw"]).train.optimizer == "adamw"  # an explicit choice stands
    p.write_text("data: {train: x.jsonl}\n")
    assert load_config(p).train.optimizer == "adamw"
