"""Plans for a GPU made on any machine: the shipped H200 seed profile decides which splits pay at a token count."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lrdeploy.bench.profiles import DeviceProfile
from lrdeploy.cli import main
from lrdeploy.errors import BudgetError, OptionError
from lrdeploy.lowrank.allocate import LayerShape, realized_ratio
from lrdeploy.bench.timer import Timer
from lrdeploy.planning.latency_aware import latency_aware_plan


def _encoder_layers(hidden: int, layers: int) -> list[LayerShape]:
    """A BERT-like encoder's linear layers as lrdeploy export writes them: Q, K, V, O, FFN up, FFN down."""
    shapes = []
    for i in range(layers):
        shapes += [LayerShape(f"l{i}.{p}", hidden, hidden) for p in ("q", "k", "v", "o")]
        shapes += [LayerShape(f"l{i}.up", hidden, 4 * hidden), LayerShape(f"l{i}.down", 4 * hidden, hidden)]
    return shapes


H200 = DeviceProfile.load("h200-fp16")


def test_shipped_profile_is_labelled_as_a_seed_and_interpolates_in_log_tokens():
    assert H200.seed and "seed profile" in H200.label and H200.device == "NVIDIA H200"
    at_1024, at_2048 = H200.latency_ms(768, 3072, None, 1024), H200.latency_ms(768, 3072, None, 2048)
    between = H200.latency_ms(768, 3072, None, int(np.sqrt(1024 * 2048)))
    assert between == pytest.approx((at_1024 + at_2048) / 2, rel=1e-3)
    assert H200.latency_ms(768, 3072, 320, 16384) / H200.latency_ms(768, 3072, None, 16384) == pytest.approx(0.68, abs=0.01)
    assert H200.latency_ms(100, 100, None, 128) is None  # shapes it never measured


@pytest.mark.parametrize("hidden", [384, 768])
def test_objective_latency_at_128_tokens_splits_nothing_and_says_why(hidden):
    shapes = _encoder_layers(hidden, 2)
    plan = latency_aware_plan("uniform", shapes, 0.5, 64, None, Timer(128, profile=H200), objective="latency")
    assert all(rank is None for rank in plan.plan.values())
    assert plan.note.startswith("no split is faster than dense at 128 tokens (profile h200-fp16 (seed profile")
    assert plan.predicted_ratio(shapes) == 1.0


def test_objective_latency_at_16384_tokens_splits_the_ffn_layers():
    shapes = _encoder_layers(384, 2)  # MiniLM's shapes
    plan = latency_aware_plan("uniform", shapes, 0.5, 64, None, Timer(16384, profile=H200), objective="latency")
    assert all(plan.plan[f"l{i}.{p}"] is not None for i in range(2) for p in ("up", "down"))
    assert all(plan.measured_speedup(s, plan.plan[s.name]) > 1 for s in shapes if plan.plan[s.name] is not None)
    assert plan.predicted_ratio(shapes) < 0.95


def test_without_an_objective_an_unmeetable_budget_is_one_choice():
    with pytest.raises(BudgetError, match=r"rank budget 0.5 cannot be met by splits that pay at 128 tokens .*pass "
                                          r"--objective size to keep the budget anyway \(slower\), or --objective "
                                          r"latency to keep those layers dense \(larger\)"):
        latency_aware_plan("uniform", _encoder_layers(768, 1), 0.5, 64, None, Timer(128, profile=H200))


def test_objective_size_keeps_the_budget_and_predicts_the_slowdown():
    shapes = _encoder_layers(768, 1)
    plan = latency_aware_plan("uniform", shapes, 0.5, 64, None, Timer(128, profile=H200), objective="size")
    assert realized_ratio(shapes, plan.plan) <= 0.5 and all(rank is not None for rank in plan.plan.values())
    assert plan.predicted_ratio(shapes) > 1.3  # REFERENCE §2: splits at 128 tokens cost 1.4–1.6× a dense GEMM
    assert "splits are slower than dense at 128 tokens" in plan.note and "predicted at ×1." in plan.note


def test_unknown_profile_is_an_option_error(tmp_path):
    with pytest.raises(OptionError, match=r"--profile 'a100' is neither a shipped profile \(h200-fp16\) nor a file"):
        DeviceProfile.load("a100")
    (tmp_path / "p.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(OptionError, match=r"not a lrdeploy-device-profile-v1 file"):
        DeviceProfile.load(tmp_path / "p.json")


def test_build_with_a_profile_reports_its_plan(transformer_files, tmp_path):
    """The tiny transformer's 64-wide layers are not in the H200 profile: nothing is split, and the report says so."""
    model, calib = transformer_files
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--profile", "h200-fp16",
                                       "--tokens", "128", "--objective", "latency", "--rank-multiple", "16",
                                       "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plan = report["latency_plan"]
    assert plan["tokens"] == 128 and plan["objective"] == "latency" and "seed profile" in plan["source"]
    assert plan["note"].startswith("no split is faster than dense at 128 tokens")
    dense = [l for l in report["layers"] if l["status"] == "dense"]
    assert len(dense) == 12 and all("has no timing of this shape and rank" in l["reason"] for l in dense)


def test_profile_command_writes_a_profile_that_build_plans_with(transformer_files, tmp_path):
    model, calib = transformer_files
    path = tmp_path / "prof" / "tiny-cpu.json"
    result = CliRunner().invoke(main, ["profile", str(model), "--tokens", "32,64", "--rank-multiple", "16",
                                       "--iterations", "2", "--threads", "1", "-o", str(path)])
    assert result.exit_code == 0, result.output
    profile = DeviceProfile.load(path)
    assert not profile.seed and profile.backend == "ort-cpu" and profile.precision == "fp32"
    assert profile.name == "tiny-cpu" and "lrdeploy profile" in profile.command
    keys = {(r["d_in"], r["d_out"], r["tokens"], r["rank"]) for r in profile.rows}
    for tokens in (32, 64):  # every shape of the model, dense and at every saving multiple of 16
        assert {(64, 64, tokens, r) for r in (None, 16)} <= keys
        assert {(64, 256, tokens, r) for r in (None, 16, 32, 48)} <= keys
        assert {(256, 64, tokens, r) for r in (None, 16, 32, 48)} <= keys
    assert all(r["ms"] > 0 for r in profile.rows)
    build = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--profile", str(path), "--tokens",
                                      "48", "--objective", "latency", "--rank-multiple", "16", "-o",
                                      str(tmp_path / "o"), "--json"])
    assert build.exit_code == 0, build.output
    plan = json.loads(build.stdout)["latency_plan"]
    assert plan["source"] == "profile tiny-cpu (measured)" and plan["tokens"] == 48
    assert plan["predicted_linear_ratio"] is not None and plan["predicted_linear_ratio"] <= 1.0


def test_torch_profile_times_the_layers_as_pytorch_modules(transformer_files, tmp_path):
    """`--backend torch-cpu` (torch-cuda is the same code on a GPU, with CUDA graphs): nn.Linear against two thin
    Linears, recorded with the torch version and the module form of the split."""
    pytest.importorskip("torch")
    model, _ = transformer_files
    path = tmp_path / "torch.json"
    result = CliRunner().invoke(main, ["profile", str(model), "--backend", "torch-cpu", "--tokens", "32",
                                       "--rank-multiple", "16", "--iterations", "2", "--threads", "1", "-o", str(path)])
    assert result.exit_code == 0, result.output
    profile = DeviceProfile.load(path)
    assert profile.backend == "torch-cpu" and profile.precision == "fp32" and not profile.seed
    raw = json.loads(path.read_text())
    assert "torch" in raw["versions"] and "nn.Linear" in raw["split_form"] and "PyTorch" in raw["source"]
    assert {(r["d_in"], r["d_out"], r["rank"]) for r in raw["rows"]} >= {(64, 256, None), (64, 256, 48)}
    assert all(r["ms"] > 0 for r in raw["rows"])


@pytest.mark.parametrize("backend, precision, message", [
    ("torch-cpu", "fp16", "--precision fp16 cannot be profiled on torch-cpu; use fp32 there"),
    ("ort-cuda", "bf16", "--precision bf16 cannot be profiled on ort-cuda; use fp16 or fp32 there"),
])
def test_profile_precision_is_checked_per_backend(tmp_path, backend, precision, message):
    result = CliRunner().invoke(main, ["profile", "--backend", backend, "--precision", precision,
                                       "-o", str(tmp_path / "p.json")])
    assert result.exit_code == 1 and result.output.strip() == f"Error: {message}"


def test_a_width_the_grid_lacks_is_interpolated_between_its_neighbours():
    """9 of MiniLM's 12 heads leave Q/K/V 288 wide, between the seed's 256 and 320: without interpolation the
    narrowed GEMM read as 0 ms and a head cut looked like it saved the whole layer."""
    profile = DeviceProfile.load("h200-fp16")
    low, high = (profile.latency_ms(384, width, None, 1024) for width in (256, 320))
    assert profile.latency_ms(384, 288, None, 1024) == pytest.approx((low + high) / 2)
    low, high = (profile.latency_ms(width, 384, None, 1024) for width in (256, 320))
    assert profile.latency_ms(288, 384, None, 1024) == pytest.approx((low + high) / 2)
    assert profile.latency_ms(384, 288, 64, 1024) is None  # splits are never guessed
    assert profile.latency_ms(384, 5000, None, 1024) is None  # nor widths outside the grid
