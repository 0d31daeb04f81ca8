"""The unified plan (`--plan unified`, `--target-latency`): the knapsack takes the cheapest options measured,
the report says what was chosen, latency targets are met by prediction or refused in one line."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.lowrank.moments import Moments
from lrdeploy.lowrank.neurons import cut_groups, cut_neurons, group_cuts, neuron_cuts, neuron_order
from tests import models


def _files(tmp_path, model, calib=96):
    onnx.save(model, tmp_path / "t.onnx")
    np.savez(tmp_path / "c.npz", **models.transformer_inputs(calib))
    np.savez(tmp_path / "e.npz", **models.transformer_inputs(64, seed=5))
    return [str(tmp_path / "t.onnx"), "--calib", str(tmp_path / "c.npz"), "--eval", str(tmp_path / "e.npz")]


def _build(tmp_path, args, *options):
    result = CliRunner().invoke(main, ["build", *args, *options, "-o", str(tmp_path / "o"), "--json"])
    return result


def test_unified_plan_takes_the_free_drop_under_a_parameter_budget(tmp_path):
    args = _files(tmp_path, models.silence_block(models.transformer(layers=3), 1))
    result = _build(tmp_path, args, "--plan", "unified", "--rank-budget", "0.7")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    plan = report["latency_plan"]
    assert plan["plan"] == "unified" and plan["resource"] == "params"
    assert plan["choices"] == ["block1 drop"] and plan["predicted_distortion"] == pytest.approx(0.0, abs=1e-6)
    dropped = [layer for layer in report["layers"] if layer["status"] == "dropped"]
    assert len(dropped) == 6 and all("unified plan" in layer["reason"] for layer in dropped)
    assert all(layer["reason"].startswith("block1 dropped (unified plan; alone it distorts the outputs by 0.0000)")
               for layer in dropped)
    assert report["params"]["linear_ratio"] <= 0.7
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.9999


def test_unified_plan_mixes_shapes_under_a_tight_budget(tmp_path):
    args = _files(tmp_path, models.transformer(layers=2))
    result = _build(tmp_path, args, "--plan", "unified", "--rank-budget", "0.4")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params"]["linear_ratio"] <= 0.4 + 1e-9
    statuses = {layer["status"] for layer in report["layers"]}
    assert statuses & {"narrowed", "dropped", "factorized"}
    assert report["latency_plan"]["predicted_ratio"] == pytest.approx(report["params"]["linear_ratio"], abs=1e-6)


def test_target_latency_from_the_h200_profile_is_predicted_and_reported(tmp_path):
    args = _files(tmp_path, models.transformer(layers=2, hidden=384, heads=6, ffn=1536), calib=256)
    result = _build(tmp_path, args, "--plan", "unified", "--target-latency", "0.75", "--tokens", "16384",
                    "--profile", "h200-fp16")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["latency_plan"]
    assert plan["resource"] == "latency" and plan["scope"] == "linear layers" and plan["tokens"] == 16384
    assert "seed profile" in plan["source"] and plan["predicted_ratio"] <= 0.75


def test_an_unreachable_latency_target_is_one_line(tmp_path):
    args = _files(tmp_path, models.transformer(layers=2, hidden=384, heads=6, ffn=1536), calib=256)
    result = _build(tmp_path, args, "--target-latency", "0.5", "--tokens", "128", "--profile", "h200-fp16",
                    "--plan", "lowrank")
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith("Error: --target-latency 0.5 cannot be reached at 128 tokens")
    # on the H200 no low-rank split pays at 128 tokens (REFERENCE §2): low-rank alone saves nothing there
    assert "fastest plan is predicted at ×1.00" in errors[0] and errors[0].endswith("or pass --plan unified")
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_target_latency_measured_here_times_the_whole_model(tmp_path):
    args = _files(tmp_path, models.transformer(layers=3))
    result = _build(tmp_path, args, "--plan", "unified", "--target-latency", "0.9", "--tokens", "256")
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)["latency_plan"]
    assert plan["scope"] == "whole model" and plan["source"] == "measured on ort-cpu"
    first = plan["attempts"][0]
    assert first["planned_for"] == 0.9 and first["predicted"] <= 0.9
    # each plan was built and timed against dense: the one kept (perhaps planned again for more or less, so its
    # prediction may lie either side of 0.9) was measured under the target, or the build warned that none was
    assert plan["measured_ratio"] in [attempt["measured"] for attempt in plan["attempts"]]
    assert plan["measured_ratio"] <= 0.9 or "--target-latency 0.9 missed" in result.output


@pytest.mark.parametrize("options, message", [
    (["--target-latency", "0.7", "--ffn-keep", "0.5"], "--ffn-keep cannot be combined with --target-latency"),
    (["--plan", "unified", "--latency-aware"], "--latency-aware cannot be combined with --plan unified"),
    (["--target-latency", "1.5"], "--target-latency 1.5 is outside (0, 1)"),
    (["--plan", "everything"], "Invalid value for '--plan'"),
])
def test_bad_plan_options_are_refused(tmp_path, options, message):
    args = _files(tmp_path, models.transformer(layers=2))
    result = _build(tmp_path, args, *options)
    assert result.exit_code != 0 and message in result.output
    assert not (tmp_path / "o").exists()


def _from_data(data):
    return Moments(float(len(data)), data.sum(0), data.T @ data)


def test_one_greedy_order_serves_every_width():
    rng = np.random.default_rng(0)
    moments, weight = _from_data(rng.standard_normal((3000, 48)) @ rng.standard_normal((48, 48))), rng.standard_normal((48, 8))
    order = neuron_order(moments.covariance, weight, 40)
    together = neuron_cuts(moments, weight, None, [8, 20, 40])
    for count in (8, 20, 40):
        np.testing.assert_array_equal(neuron_order(moments.covariance, weight, count), order[:count])
        np.testing.assert_array_equal(together[count].keep, np.sort(order[:count]))
        np.testing.assert_allclose(together[count].weight, cut_neurons(moments, weight, None, count).weight)


def test_one_elimination_serves_every_head_count():
    rng = np.random.default_rng(1)
    moments = _from_data(rng.standard_normal((3000, 32)) @ rng.standard_normal((32, 32)))
    weight = rng.standard_normal((32, 16))
    together = group_cuts(moments, weight, None, 8, [6, 4, 2])
    for count in (6, 4, 2):
        heads, cut = cut_groups(moments, weight, None, 8, count)
        assert together[count][0] == heads
        np.testing.assert_allclose(together[count][1].weight, cut.weight)


def test_cut_options_measured_as_layer_errors_equal_the_cut_models(tmp_path):
    """An FFN or head option changes its block only through the projection it refits, so the sensitivity graph's
    weight error on that projection gives the distortion of the whole cut model, without copying the model."""
    import onnx_graphsurgeon as gs

    from lrdeploy.calib.cache import StatisticsCache
    from lrdeploy.calib.data import Feeds, SampleSet, model_input_specs
    from lrdeploy.calib.stats import collect_moments
    from lrdeploy.passes.linear_layers import find_linear_layers
    from lrdeploy.planning.blocks import find_block_parts, structure_requests
    from lrdeploy.planning.options import cut_options, measure_cut_losses
    from lrdeploy.progress import SILENT
    from lrdeploy.settings.build import BuildConfig
    from lrdeploy.stages.distortion import DistortionProbe

    model = models.transformer()
    config = BuildConfig.from_options(model=tmp_path / "t.onnx", plan="unified", cache_dir=None)
    graph = gs.import_onnx(model)
    layers = find_linear_layers(graph)
    parts = find_block_parts(config, graph, layers)
    inputs = models.transformer_inputs(48)
    feeds = Feeds(model_input_specs(model), 16, "attention_mask")
    requests = structure_requests(parts)
    moments = collect_moments(model, requests, lambda: feeds.batches(SampleSet(inputs)), "attention_mask")
    options = [option for option in cut_options(parts, moments, 16) if option.kind != "drop"]
    assert {option.kind for option in options} == {"ffn", "heads"}
    probe = SampleSet({name: array[:16] for name, array in inputs.items()})
    measure_cut_losses(model, options, probe, feeds, config, StatisticsCache(None, [], ""), SILENT)
    whole = DistortionProbe(model, feeds.batches(probe), 0, "attention_mask")
    for option in options:
        assert option.loss == pytest.approx(whole.of_model(option.cut.applied_to(model)), rel=1e-3, abs=1e-6)
    assert max(option.loss for option in options) > 1e-3  # the cuts do cost something


def test_fixed_cuts_with_the_unified_plan_make_a_constrained_plan(tmp_path):
    """--plan unified --ffn-keep 0.5: every FFN keeps half its neurons (as --ffn-keep alone cuts them), the plan
    chooses the attention's heads or ranks for what is left of the budget, and the budget counts both."""
    args = _files(tmp_path, models.transformer(layers=3))
    fixed = json.loads(_build(tmp_path, args, "--ffn-keep", "0.5", "--rank-budget", "1", "--plan", "lowrank").stdout)
    result = _build(tmp_path, args, "--plan", "unified", "--ffn-keep", "0.5", "--rank-budget", "0.6")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    layers = {layer["name"]: layer for layer in report["layers"]}
    ffn = [name for name in layers if name.endswith(("intermediate/MatMul", "output/MatMul"))
           and "attention" not in name]
    assert len(ffn) == 6 and all(layers[name]["reason"] == "128 of 256 FFN neurons kept (--ffn-keep)" for name in ffn)
    assert all(layers[name]["params_after"] == {l["name"]: l for l in fixed["layers"]}[name]["params_after"]
               for name in ffn)
    attention = [layer for name, layer in layers.items() if "attention" in name and layer["status"] != "skipped"]
    assert attention and all(layer["status"] in ("dense", "factorized", "narrowed") for layer in attention)
    assert all("(unified plan)" in layer["reason"] for layer in attention if layer["status"] == "narrowed")
    assert report["params"]["linear_ratio"] <= 0.6 < fixed["params"]["linear_ratio"]
    assert report["latency_plan"]["predicted_ratio"] == pytest.approx(report["params"]["linear_ratio"], abs=1e-9)
    assert not any(choice.endswith(("ffn", "drop")) or " ffn " in choice for choice in report["latency_plan"]["choices"])


def test_a_fixed_drop_with_the_unified_plan_leaves_the_other_blocks_to_the_plan(tmp_path):
    """--plan unified --drop-blocks 1: the silent block is dropped (as --drop-blocks alone chooses), the plan offers
    no further drop and cuts the other blocks for the rest of the budget."""
    args = _files(tmp_path, models.silence_block(models.transformer(layers=3), 2))
    result = _build(tmp_path, args, "--plan", "unified", "--drop-blocks", "1", "--rank-budget", "0.5")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    dropped = [layer for layer in report["layers"] if layer["status"] == "dropped"]
    assert len(dropped) == 6 and all(layer["name"].startswith("layer2/") and "(--drop-blocks;" in layer["reason"]
                                     for layer in dropped)
    assert not any("drop" in choice for choice in report["latency_plan"]["choices"])
    assert report["params"]["linear_ratio"] <= 0.5
    assert report["latency_plan"]["predicted_ratio"] == pytest.approx(report["params"]["linear_ratio"], abs=1e-9)
