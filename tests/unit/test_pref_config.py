"""Per-method settings in the YAML: validated where they are read, and mistakes name the field."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tunelab.config import config_from_dict, dump_config
from tunelab.errors import ConfigError


def cfg(**kw: Any) -> Any:
    return config_from_dict({"data": {"train": "x.jsonl"}, **kw})


def test_defaults_and_round_trip() -> None:
    c = cfg(method="dpo", dpo={"beta": 0.2, "loss_type": "ipo", "precompute_ref": True})
    assert c.dpo.beta == 0.2 and c.dpo.loss_type == "ipo" and c.dpo.precompute_ref
    assert c.simpo.gamma == 1.0 and c.kto.desirable_weight == 1.0
    g = cfg(method="grpo", grpo={"rewards": [{"fn": "json_schema", "json_schema": {"type": "object"}}]})
    for one in (c, g):
        assert config_from_dict(yaml.safe_load(dump_config(one))) == one  # a run's config.yaml loads back


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        ({"method": "dpo", "dpo": {"beta": 0}}, "dpo.beta"),
        ({"method": "dpo", "dpo": {"loss_type": "exo"}}, "dpo.loss_type"),
        ({"method": "dpo", "dpo": {"betta": 0.1}}, "did you mean 'beta'"),
        ({"method": "orpo", "dpo": {"beta": 0.3}}, "`dpo:` settings are given but method is 'orpo'"),
        ({"method": "simpo", "simpo": {"gamma": -1}}, "simpo.gamma"),
        ({"method": "ppo"}, "needs a `ppo:` section"),
        ({"method": "ppo", "ppo": {"kl_coef": 0.1}}, "ppo.reward_model"),
        ({"method": "ppo", "ppo": {"reward_model": "r", "clip_eps": 1.5}}, "ppo.clip_eps"),
        ({"method": "grpo", "grpo": {"group_size": 4}}, "needs `rewards`"),
        ({"method": "grpo", "grpo": {"group_size": 1, "rewards": [{"fn": "json_valid"}]}}, "grpo.group_size"),
        ({"method": "grpo", "grpo": {"rewards": [{"fn": "regex", "pattern": "("}]}}, "bad pattern"),
        ({"method": "grpo", "grpo": {"rewards": [{"fn": "length"}]}}, "needs `max_chars`"),
        ({"method": "grpo", "grpo": {"rewards": [{"fn": "bleu"}]}}, "grpo.rewards.0.fn"),
    ],
)
def test_bad_settings_name_the_field(raw: dict[str, Any], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        cfg(**raw)
    assert needle in str(e.value.message)
