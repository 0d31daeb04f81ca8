"""`--target-latency` measured here is held to the clock: each plan is timed against the dense model and planned
again when the clock misses the target (`planning.clock_check`). The clock is replaced by a scripted one here,
so the loop's decisions are checked exactly; the real timing runs in test_unified_plan's measured-here test."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.planning import clock_check
from lrdeploy.planning.clock_check import next_target
from tests import models


def _build(tmp_path, *options, model=None, calib=96):
    onnx.save(model or models.transformer(layers=3), tmp_path / "t.onnx")
    np.savez(tmp_path / "c.npz", **models.transformer_inputs(calib))
    np.savez(tmp_path / "e.npz", **models.transformer_inputs(64, seed=5))
    return CliRunner().invoke(main, ["build", str(tmp_path / "t.onnx"), "--calib", str(tmp_path / "c.npz"), "--eval",
                                     str(tmp_path / "e.npz"), *options, "-o", str(tmp_path / "o"), "--json"])


def _scripted_costs(monkeypatch):
    """The options' savings, scripted too: every structured variant and lone GEMM gets a fixed time, so the plans
    (and so the loop) do not depend on how busy the machine is (under load the measured savings once left the
    corrected target out of reach, and the loop stopped after one plan)."""
    from lrdeploy.bench import timer
    from lrdeploy.bench.layer_latency import ShapeTiming
    from lrdeploy.planning import options

    cost = {"ffn": 9.8, "heads": 9.85, "drop": 9.0, "lowrank": 9.9}  # ms against a 10 ms dense model

    def time_variants(model, variants, config, progress):
        return {"dense": 10.0, **{name: cost[name.split(":")[0]] for name in variants}}

    def time_shapes(needed, tokens, device, threads):
        return {(d_in, d_out): ShapeTiming(d_in, d_out, tokens, 0.1, {r: 0.05 + 0.05 * r / min(d_in, d_out)
                                                                      for r in ranks})
                for (d_in, d_out), ranks in needed.items()}

    monkeypatch.setattr(options, "time_variants", time_variants)
    monkeypatch.setattr(timer, "time_shapes", time_shapes)


def _scripted_clock(monkeypatch, measure):
    """Replace the timing of planned models by `measure(predicted ratio of the plan being timed)`: the ratio at
    --tokens, or a dict {tokens: ratio}; and the options' costs by fixed ones (`_scripted_costs`)."""
    _scripted_costs(monkeypatch)
    seen = []
    real_plan_shapes = clock_check.plan_shapes

    def plan_shapes(*args, **kwargs):
        plan = real_plan_shapes(*args, **kwargs)
        seen.append(plan.predicted_ratio)
        return plan

    monkeypatch.setattr(clock_check, "plan_shapes", plan_shapes)
    def measured_ratios(dense, planned, config, progress):
        ratio = measure(seen[-1])
        return ratio if isinstance(ratio, dict) else {config.planning.tokens: ratio}

    monkeypatch.setattr(clock_check, "measured_ratios", measured_ratios)
    return seen


def test_next_target_takes_the_clocks_bias_out():
    assert next_target(0.6, 0.58, 0.636) == pytest.approx(0.6 * 0.58 / 0.636)
    assert next_target(0.6, 0.55, 0.5) == pytest.approx(0.66)  # measured under: plan for more


@pytest.mark.slow
def test_a_plan_the_clock_finds_slow_is_planned_again_until_it_meets_the_target(tmp_path, monkeypatch):
    seen = _scripted_clock(monkeypatch, lambda predicted: 1.2 * predicted)
    result = _build(tmp_path, "--plan", "unified", "--target-latency", "0.9", "--tokens", "256")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["latency_plan"]
    first, second = plan["attempts"][:2]
    assert first["planned_for"] == 0.9 and first["measured"] == pytest.approx(1.2 * first["predicted"])
    assert first["measured"] > 0.9
    assert second["planned_for"] == pytest.approx(0.9 / 1.2)  # target × predicted / measured
    assert second["predicted"] <= 0.75 + 1e-9 and second["measured"] <= 0.9
    assert plan["measured_ratio"] <= 0.9
    assert plan["measured_ratio"] == pytest.approx(1.2 * plan["predicted_ratio"])
    assert len(seen) == len(plan["attempts"])
    meeting = [a for a in plan["attempts"] if a["measured"] <= 0.9]
    assert plan["predicted_distortion"] == min(a["distortion"] for a in meeting)  # the least distorting kept
    markdown = (tmp_path / "o" / "report.md").read_text()
    assert f"measured ×{plan['measured_ratio']:.3f}" in markdown and "| ×0.900 |" in markdown


@pytest.mark.slow
def test_a_target_the_clock_never_meets_keeps_the_fastest_plan_and_warns(tmp_path, monkeypatch):
    # always over 0.9, and so close to it that the corrected targets (~0.84) stay within the tiny model's reach:
    # a clock far off (e.g. predicted + 0.5) asks for targets no plan reaches, and the loop stops after one plan
    _scripted_clock(monkeypatch, lambda predicted: 0.95 + 0.01 * predicted)
    result = _build(tmp_path, "--plan", "unified", "--target-latency", "0.9", "--tokens", "256")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["latency_plan"]
    assert len(plan["attempts"]) >= 2 and all(a["measured"] > 0.9 for a in plan["attempts"])
    assert plan["measured_ratio"] == min(a["measured"] for a in plan["attempts"])
    assert "--target-latency 0.9 missed: the fastest of" in result.output


@pytest.mark.slow
def test_check_tokens_hold_the_target_at_the_worst_token_count(tmp_path, monkeypatch):
    # batch 1 (128 rows) is 1.2× worse than the plan's 256 rows: the plan must meet the target there too
    _scripted_clock(monkeypatch, lambda predicted: {256: predicted, 128: 1.2 * predicted})
    result = _build(tmp_path, "--plan", "unified", "--target-latency", "0.9", "--tokens", "256", "--check-tokens", "128")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["latency_plan"]
    for attempt in plan["attempts"]:
        assert attempt["by_tokens"] == {"256": pytest.approx(attempt["predicted"]),
                                        "128": pytest.approx(1.2 * attempt["predicted"])}
        assert attempt["measured"] == attempt["by_tokens"]["128"]
    assert plan["measured_ratio"] <= 0.9 and plan["predicted_ratio"] <= 0.75 + 1e-9
    assert "128: ×" in (tmp_path / "o" / "report.md").read_text()


def test_check_tokens_without_a_measured_target_are_refused(tmp_path):
    result = _build(tmp_path, "--check-tokens", "128")
    assert result.exit_code == 1 and "Error: --check-tokens holds a --target-latency measured here" in result.output
    assert not (tmp_path / "o").exists()


def test_a_plan_from_a_device_profile_is_not_timed_here(tmp_path, monkeypatch):
    monkeypatch.setattr(clock_check, "measured_ratios", lambda *args: pytest.fail("timed a profile's plan"))
    result = _build(tmp_path, "--plan", "unified", "--target-latency", "0.9", "--tokens", "16384", "--profile",
                    "h200-fp16", model=models.transformer(layers=2, hidden=384, heads=6, ffn=1536), calib=256)
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["latency_plan"]
    assert plan["measured_ratio"] is None and plan["attempts"] == []
    assert "measured not here (a device profile's plan)" in (tmp_path / "o" / "report.md").read_text()
