"""`tunelab plan cost`: the guide's example and the break-even arithmetic."""

from __future__ import annotations

import json

import pytest

from tunelab.cli import main
from tunelab.errors import TunelabError
from tunelab.plan.cost import CostInputs, compute


def test_guide_example_500_tokens_times_10_million_calls() -> None:
    # Guide: "removes 500 tokens ... ten million calls per month, you are saving five billion tokens of input".
    r = compute(CostInputs(calls_per_month=10_000_000, prompt_tokens_removed=500, input_price=0.15))
    assert r["input_tokens_saved_per_month"] == 5_000_000_000
    assert r["monthly_saving"] == pytest.approx(5e9 * 0.15 / 1e6)  # $750


def test_break_even_month_from_throughput_and_gpu_price() -> None:
    # 20M tokens x 3 epochs at 2,000 tok/s = 8.33 GPU-hours x $2 = $16.67; saving $750/month -> month 1.
    r = compute(CostInputs(calls_per_month=10_000_000, prompt_tokens_removed=500, input_price=0.15,
                           train_tokens=20e6, epochs=3, tokens_per_s=2000, gpu_hour_price=2.0, extra_cost=1500))
    assert r["gpu_hours"] == pytest.approx(60e6 / 2000 / 3600)
    assert r["training_cost"] == pytest.approx(r["gpu_hours"] * 2.0)
    assert r["break_even_months"] == pytest.approx((r["training_cost"] + 1500) / 750)
    assert r["break_even_month"] == 3
    # At a thousand calls a month the same saving is $0.075 a month: break-even after 20,000 months.
    low = compute(CostInputs(calls_per_month=1000, prompt_tokens_removed=500, input_price=0.15, extra_cost=1500))
    assert low["monthly_saving"] == pytest.approx(0.075)
    assert low["break_even_month"] == 20_000


def test_switch_from_a_hosted_large_model_to_a_self_hosted_7b() -> None:
    c = CostInputs(calls_per_month=10_000_000, prompt_tokens=800, prompt_tokens_removed=500, output_tokens=200,
                   input_price=2.5, output_price=10.0, new_input_price=0.2, new_output_price=0.2,
                   hosting_per_month=1000, train_tokens=5e6, epochs=3, train_price=25.0)
    r = compute(c)
    assert r["monthly_cost_before"] == pytest.approx(10e6 * (800 * 2.5 + 200 * 10) / 1e6)  # $40,000
    assert r["monthly_cost_after"] == pytest.approx(10e6 * (300 * 0.2 + 200 * 0.2) / 1e6 + 1000)  # $2,000
    assert r["training_cost"] == pytest.approx(15e6 * 25 / 1e6)
    assert r["break_even_month"] == 1
    # Hosting that costs more than the switch saves never breaks even.
    dear = compute(CostInputs(calls_per_month=1000, prompt_tokens_removed=500, input_price=0.15,
                              hosting_per_month=500, extra_cost=10))
    assert dear["monthly_saving"] < 0 and dear["break_even_month"] is None


def test_bad_inputs() -> None:
    with pytest.raises(TunelabError, match="calls-per-month"):
        compute(CostInputs(calls_per_month=-1))
    with pytest.raises(TunelabError, match="tokens-per-s"):
        compute(CostInputs(calls_per_month=1, train_tokens=1000))


def test_cli(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["plan", "cost", "--calls-per-month", "10000000", "--prompt-tokens-removed", "500",
              "--input-price", "0.15", "--train-tokens", "2e7", "--epochs", "3", "--tokens-per-s", "2000",
              "--gpu-hour-price", "2", "--json"])
    assert e.value.code == 0
    d = json.loads(capsys.readouterr().out)
    assert d["input_tokens_saved_per_month"] == 5e9 and d["break_even_month"] == 1
    with pytest.raises(SystemExit) as e:
        main(["plan", "cost", "--calls-per-month", "10000000", "--prompt-tokens-removed", "500",
              "--input-price", "0.15"])
    out = capsys.readouterr().out
    assert "5,000,000,000" in out and "saving $750.00 a month" in out
