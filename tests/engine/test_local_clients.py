"""`base_url: local`: the judge and synth generate in-process through the engine (LocalChatClient), with the
same text `Generator.chat` (hence `tunelab generate` and `tunelab serve`) gives for the same messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from tunelab.data.toolkit.synth import SynthConfig, Synthesizer, _Failure
from tunelab.eval.config import JudgeSettings
from tunelab.eval.judge import Judge
from tunelab.generate import Generator


def test_local_judge_asks_the_local_model(lora_base_dir: Path) -> None:
    settings = JudgeSettings(base_url="local", model=str(lora_base_dir), max_tokens=6)
    judge = Judge(settings)
    verdict, raw = judge.ask("2+2?", "4", "5")
    text = settings.prompt.format(rubric=settings.rubric, prompt="2+2?", answer_a="4", answer_b="5")
    expected = Generator.load(str(lora_base_dir)).chat([{"role": "user", "content": text}], max_tokens=6)
    assert raw == expected
    assert verdict in ("A", "B", "tie", "invalid")


def test_local_synth_calls_the_local_model(lora_base_dir: Path, tmp_path: Path) -> None:
    s = Synthesizer(SynthConfig(base_url="local", model=str(lora_base_dir), cache_dir=str(tmp_path), max_tokens=4,
                                temperature=0.0))
    with pytest.raises(_Failure) as e:  # a random tiny model does not write JSON
        s._call_json(str(lora_base_dir), "write a JSON object")
    assert e.value.kind == "bad_json" and s.calls == 1
