"""Error-aware refit: the side-by-side graph, the least-squares solve, and the gain on a real build."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.lowrank.decompose import decompose
from lrdeploy.passes.factorize import factorize_layers
from lrdeploy.passes.linear_layers import find_linear_layers
from lrdeploy.lowrank.moments import JointMoments, Moments
from lrdeploy.passes.side_by_side import PREFIX, side_by_side
from lrdeploy.lowrank.refit import solve_both_factors, solve_second_factor
from lrdeploy.stages.refit import refit_stages
from tests import models
from tests.conftest import run_model


def test_side_by_side_runs_both_models_on_shared_inputs():
    original = models.transformer(layers=1)
    graph = gs.import_onnx(original)
    layers = find_linear_layers(graph)
    factors = {l.name: decompose("svd", l.weight, l.bias).factors(16) for l in layers if l.eligible}
    factorize_layers(graph, layers, factors)
    compressed = gs.export_onnx(graph)
    joint = side_by_side(original, compressed)
    assert [i.name for i in joint.graph.input] == ["input_ids", "attention_mask"]
    assert [o.name for o in joint.graph.output] == ["last_hidden_state", "embedding", f"{PREFIX}last_hidden_state",
                                                     f"{PREFIX}embedding"]
    feeds = models.transformer_inputs(4)
    outputs = run_model(joint, feeds)
    for got, want in zip(outputs, run_model(original, feeds) + run_model(compressed, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_least_squares_recovers_an_exact_second_factor():
    rng = np.random.default_rng(1)
    z = rng.standard_normal((500, 6))
    second, bias = rng.standard_normal((6, 10)), rng.standard_normal(10)
    y = z @ second + bias
    moments = JointMoments(Moments(500.0, z.sum(0), z.T @ z), y.sum(0), z.T @ y)
    factors = solve_second_factor(np.eye(6), moments, ridge=1e-12)
    np.testing.assert_allclose(factors.second, second, atol=1e-6)
    np.testing.assert_allclose(factors.bias, bias, atol=1e-6)


def test_reduced_rank_refit_without_upstream_error_is_feature_pca():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((2000, 12)) @ rng.standard_normal((12, 12)) + rng.standard_normal(12)
    weight, bias = rng.standard_normal((12, 9)), rng.standard_normal(9)
    y = x @ weight + bias
    moments = JointMoments(Moments(2000.0, x.sum(0), x.T @ x), y.sum(0), x.T @ y)
    refit = solve_both_factors(4, moments, ridge=1e-12)
    pca = decompose("pca", weight, bias, Moments(2000.0, x.sum(0), x.T @ x)).factors(4)
    np.testing.assert_allclose(refit.first @ refit.second, pca.first @ pca.second, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(refit.bias, pca.bias, rtol=1e-6, atol=1e-6)
    exact = solve_both_factors(9, moments, ridge=1e-12)  # full rank: the least-squares map itself
    np.testing.assert_allclose(exact.first @ exact.second, weight, atol=1e-6)


def test_stages_group_layers_reading_one_tensor_in_model_order():
    layers = [l for l in find_linear_layers(gs.import_onnx(models.transformer(layers=2))) if l.eligible]
    stages = refit_stages(layers, {l.name: None for l in layers})
    assert [len(s) for s in stages] == [3, 1, 1, 1] * 2  # Q/K/V, attention output, FFN up, FFN down
    assert stages[0][0].name == "layer0/attention/query/MatMul"


@pytest.mark.slow
def test_refit_improves_held_out_accuracy(transformer_files, tmp_path):
    model, calib = transformer_files
    cosines = []
    for extra in ([], ["--refit", "--refit-mode", "second"], ["--refit"]):  # "both" is the default mode
        result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--rank-budget", "0.5",
                                           "--plan", "lowrank", "-o", str(tmp_path / str(len(extra))), "--json", *extra])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        cosines.append(report["accuracy"]["outputs"]["embedding"]["cosine_mean"])
    assert "refit" in report["timings"]
    assert cosines[1] > cosines[0] + 0.005
    assert cosines[2] > cosines[0] + 0.005


def _tensor_values(model, names, feeds):
    """The values of inner tensors `names` of `model` on `feeds` (each exposed as an extra graph output)."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    for name in names:
        tensors[name].dtype = np.float32
        graph.outputs.append(tensors[name])
    values = run_model(gs.export_onnx(graph), feeds)
    return values[-len(names):]


@pytest.mark.parametrize("cut", [["--ffn-keep", "0.5"], ["--heads-keep", "0.5"]])
def test_a_cut_projection_is_refit_by_least_squares_on_what_the_cut_model_feeds_it(transformer_files, cut):
    """The last block's cut projection (FFN down, or attention output) after --refit is the ridge least-squares map
    from its narrowed input in the compressed model to the original model's output of that projection, on the
    calibration positions (padding left out), computed here independently with numpy."""
    from lrdeploy.passes.compose import compressed_model
    from lrdeploy.pipeline.build import choose_factors, prepare_build
    from lrdeploy.settings.build import BuildConfig

    model, calib = transformer_files
    config = BuildConfig.from_options(model=model, rank_budget=1.0, calib=str(calib), refit=True, cache_dir=None,
                         ffn_keep=0.5 if "--ffn-keep" in cut else None, heads_keep=0.5 if "--heads-keep" in cut else None)
    prepared = prepare_build(config)
    chosen = choose_factors(prepared, 1.0)
    refit_cuts = chosen.structured.ffn or chosen.structured.heads
    block, new = refit_cuts[-1][0], refit_cuts[-1][-1]
    layer = block.down if "--ffn-keep" in cut else block.output
    original = prepared.inspection.model.proto
    compressed = compressed_model(original, prepared.inspection.layers, chosen.factors, chosen.structured)
    feeds = list(prepared.feeds.batches(prepared.samples.calib.select(slice(0, config.factorization.refit_samples))))
    sources, targets = [], []
    for feed in feeds:
        (source,) = _tensor_values(compressed, [layer.input_name], feed)
        (target,) = _tensor_values(original, [layer.output_name], feed)
        real = feed["attention_mask"].astype(bool)
        sources.append(source[real].astype(np.float64))
        targets.append(target[real].astype(np.float64))
    x, y = np.concatenate(sources), np.concatenate(targets)
    assert x.shape[1] == len(new.keep) < layer.d_in  # the narrowed input
    cov = np.cov(x, rowvar=False, bias=True)
    cross = (x - x.mean(0)).T @ (y - y.mean(0)) / len(x)
    weight = np.linalg.solve(cov + 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov)), cross)
    np.testing.assert_allclose(new.weight, weight, rtol=2e-3, atol=2e-3 * np.abs(weight).max())
    np.testing.assert_allclose(new.bias, y.mean(0) - x.mean(0) @ weight, atol=2e-3 * np.abs(y).max())
    before = prepared.structured.ffn or prepared.structured.heads
    assert not np.allclose(before[-1][-1].weight, new.weight, atol=1e-4)  # the refit changed the cut's own solve


@pytest.mark.slow
@pytest.mark.parametrize("plan, gain", [
    (["--plan", "unified", "--rank-budget", "0.4"], 0.001),  # cuts heads and FFNs in every block, splits the rest
    (["--drop-blocks", "1", "--rank-budget", "0.7"], 0.05),  # the blocks after the dropped one make up for it
])
def test_refit_after_any_plan_improves_held_out_accuracy(tmp_path, plan, gain):
    model, calib = tmp_path / "tiny.onnx", tmp_path / "calib.npz"
    onnx.save(models.transformer(layers=3), model)
    np.savez(calib, **models.transformer_inputs(96))
    cosines = []
    for extra in ([], ["--refit"]):
        result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), *plan,
                                           "-o", str(tmp_path / str(len(extra))), "--json", *extra])
        assert result.exit_code == 0, result.output
        cosines.append(json.loads(result.stdout)["accuracy"]["outputs"]["embedding"]["cosine_mean"])
    assert cosines[1] > cosines[0] + gain, cosines
