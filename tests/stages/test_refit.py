"""Error-aware refit: the side-by-side graph, the least-squares solve, and the gain on a real build."""

import json

import numpy as np
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
                                           "-o", str(tmp_path / str(len(extra))), "--json", *extra])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        cosines.append(report["accuracy"]["outputs"]["embedding"]["cosine_mean"])
    assert "refit" in report["timings"]
    assert cosines[1] > cosines[0] + 0.005
    assert cosines[2] > cosines[0] + 0.005
