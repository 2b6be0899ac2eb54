"""Preference-training commands (`tunelab reward score`) and the registration of the preference and RL
methods with `tunelab train` (method name -> module:Class, as in tunelab.train.run.METHODS).
"""

from __future__ import annotations

from typing import Any

PREF_METHODS: dict[str, str] = {
    "reward": "tunelab.train.reward:Reward",
    "dpo": "tunelab.train.dpo:DPO",
    "orpo": "tunelab.train.orpo:ORPO",
    "simpo": "tunelab.train.simpo:SimPO",
    "kto": "tunelab.train.kto:KTO",
    "ppo": "tunelab.train.ppo:PPO",
    "grpo": "tunelab.train.grpo:GRPO",
}


def register_methods() -> None:
    from tunelab.train.run import METHODS

    for k, v in PREF_METHODS.items():
        METHODS.setdefault(k, v)


def register(app: Any, data_app: Any) -> None:
    register_methods()
