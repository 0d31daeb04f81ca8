"""Sweeps: one calibration, accuracy falling with the budget, bisection meeting its target."""

import json

import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.errors import OptionError
from lrdeploy.settings.build import BuildConfig
from lrdeploy.pipeline.sweep import SweepSettings, parse_target, run_sweep


def test_sweep_accuracy_does_not_rise_as_budget_falls(transformer_files, tmp_path):
    model, calib = transformer_files
    report = run_sweep(BuildConfig.from_options(model=model, calib=str(calib), output_dir=tmp_path),
                       SweepSettings([0.9, 0.7, 0.5, 0.4], bench_batch=None))
    assert [p.budget for p in report.points] == [0.9, 0.7, 0.5, 0.4]
    cosines = [p.cosine_mean for p in report.points]
    assert cosines == sorted(cosines, reverse=True)
    assert all(p.linear_ratio <= p.budget for p in report.points)
    for p in report.points:  # every budget's model is kept in its own folder
        assert p.output_model.endswith(f"rho_{p.budget:.3f}/tiny.lowrank.onnx")
    data = json.loads((tmp_path / "sweep.json").read_text())
    assert [p["budget"] for p in data["points"]] == [0.9, 0.7, 0.5, 0.4]
    assert (tmp_path / "report.html").is_file() and (tmp_path / "sweep.md").is_file()


@pytest.mark.parametrize("allocation", ["uniform", "sensitivity"])
def test_bisection_finds_smallest_budget_meeting_target_and_keeps_only_it(transformer_files, tmp_path, allocation):
    model, calib = transformer_files
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["sweep", str(model), "--calib", str(calib), "-o", str(out),
                                       "--target-cosine", "0.9", "--bench-batch", "0", "--allocation", allocation])
    assert result.exit_code == 0, result.output
    data = json.loads((out / "sweep.json").read_text())
    chosen = data["chosen"]
    points = {p["budget"]: p for p in data["points"]}
    assert points[chosen]["cosine_mean"] >= 0.9
    assert all(p["cosine_mean"] < 0.9 for b, p in points.items() if b < chosen)  # every smaller budget tried fails
    assert max((b for b in points if b < chosen), default=0) > chosen - 0.03  # narrowed to the tolerance
    kept = sorted(p.name for p in out.iterdir())
    assert kept == ["report.html", "report.json", "report.md", "sweep.json", "sweep.md", "tiny.lowrank.onnx"]
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["allocation"] == allocation
    assert report["config"]["rank_budget"] == chosen and report["output_model"] == str(out / "tiny.lowrank.onnx")


def test_unreachable_target_is_an_error(transformer_files, tmp_path, monkeypatch):
    import lrdeploy.pipeline.sweep as sweep_module

    def bisect_finding_nothing(sweep, metric, target, low, **kwargs):
        sweep.evaluate(1.0)
        return None

    monkeypatch.setattr(sweep_module, "bisect_budget", bisect_finding_nothing)
    model, calib = transformer_files
    result = CliRunner().invoke(main, ["sweep", str(model), "--calib", str(calib), "-o", str(tmp_path / "out"),
                                       "--target-cosine", "0.99", "--bench-batch", "0"])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: no budget reaches cosine_mean ≥ 0.99 (best 1.0000, at ρ=1.0); lower the target")
    assert not list((tmp_path / "out").glob("rho_*"))


def test_budget_one_keeps_every_layer_dense(transformer_files, tmp_path):
    model, calib = transformer_files
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--rank-budget", "1", "-o",
                                       str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {l["status"] for l in report["layers"]} == {"dense", "skipped"} and report["params"]["linear_ratio"] == 1.0
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] == pytest.approx(1.0, abs=1e-6)


def test_target_metric_parsing():
    assert parse_target(0.97, None) == ("cosine_mean", 0.97)
    assert parse_target(None, "topk_agreement=0.8") == ("topk_agreement", 0.8)
    with pytest.raises(OptionError, match="is not NAME=VALUE with NAME one of cosine_mean, cosine_p5, topk_agreement"):
        parse_target(None, "accuracy=0.9")
