"""Sensitivity allocation: the knapsack against a brute-force optimum, and the measurements themselves."""

import itertools

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner

from lrdeploy.calib.data import SampleSet, iter_batches, model_input_specs
from lrdeploy.calib.stats import TensorRequest, collect_moments
from lrdeploy.cli import main
from lrdeploy.lowrank.allocate import LayerShape, greedy_ranks, realized_ratio
from lrdeploy.lowrank.decompose import decompose
from lrdeploy.passes.linear_layers import find_linear_layers
from lrdeploy.passes.inject_error import error_injected_model
from lrdeploy.stages.sensitivity import candidate_ranks, measure_sensitivity, sensitivity_loss
from tests import models
from tests.conftest import run_model

SHAPES = [LayerShape("a", 128, 128), LayerShape("b", 128, 128), LayerShape("c", 128, 256)]
# convex, decreasing losses of different steepness: the optimum is not uniform
SCALES = {"a": 10.0, "b": 1.0, "c": 4.0}


def _loss(shape, rank):
    return 0.0 if rank is None else SCALES[shape.name] * np.exp(-rank / 24)


def _brute_force(budget, multiple):
    options = {s.name: [k for k in range(multiple, 129, multiple) if s.saves(k)] + [None] for s in SHAPES}
    best = None
    for combo in itertools.product(*options.values()):
        plan = dict(zip(options, combo))
        if realized_ratio(SHAPES, plan) <= budget:
            total = sum(_loss(s, plan[s.name]) for s in SHAPES)
            best = total if best is None or total < best else best
    return best


@pytest.mark.parametrize("budget", [0.3, 0.45, 0.6])
def test_knapsack_reaches_the_brute_force_optimum(budget):
    plan = greedy_ranks(SHAPES, _loss, budget, 16)
    assert realized_ratio(SHAPES, plan) <= budget
    assert sum(_loss(s, plan[s.name]) for s in SHAPES) == pytest.approx(_brute_force(budget, 16), rel=1e-9)
    assert plan["a"] is None or plan["b"] is None or plan["a"] >= plan["b"]  # the steeper layer gets more rank


def test_knapsack_is_not_stuck_by_a_flat_stretch():
    """A loss that only falls after a plateau still gets rank (the greedy looks past the next step)."""
    shapes = [LayerShape("plateau", 128, 128), LayerShape("smooth", 128, 128)]

    def loss(shape, rank):
        if rank is None:
            return 0.0
        if shape.name == "plateau":
            return 5.0 if rank < 48 else 0.1
        return 1.0 / rank

    plan = greedy_ranks(shapes, loss, 0.5, 16)
    assert plan["plateau"] >= 48


def sensitivity_inputs():
    """A one-block transformer: (model, its eligible layers, their decompositions, two probe batches)."""
    model = models.transformer(layers=1)
    graph = gs.import_onnx(model)
    layers = [l for l in find_linear_layers(graph) if l.eligible]
    inputs = models.transformer_inputs(32)
    specs = model_input_specs(model)
    moments = collect_moments(model, [TensorRequest(l.input_name, l.d_in) for l in layers], lambda: [inputs],
                              mask_name="attention_mask", threads=1)
    decompositions = {l.name: decompose("pca", l.weight, l.bias, moments[l.input_name]) for l in layers}
    return model, layers, decompositions, list(iter_batches(SampleSet(inputs), specs, 16, "attention_mask"))


@pytest.fixture(scope="module")
def measured():
    model, layers, decompositions, feeds = sensitivity_inputs()
    table = measure_sensitivity(model, layers, decompositions, 16, feeds, threads=1, group_size=4)
    return model, layers, decompositions, table, feeds


def test_injected_model_with_zero_errors_is_the_original(measured):
    model, layers, _, _, feeds = measured
    injected, error_inputs = error_injected_model(model, layers)
    assert [i.name for i in injected.graph.input][2:] == [name for inputs in error_inputs
                                                         for name in (inputs.weight, inputs.bias)]
    zeros = {}
    for layer, inputs in zip(layers, error_inputs):
        zeros.update(inputs.zeros(layer))
    for a, b in zip(run_model(model, feeds[0]), run_model(injected, {**feeds[0], **zeros})):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_injected_error_equals_cutting_that_layer_alone(measured):
    """Feeding A·B − W and c − b into one layer gives exactly the model with that layer split."""
    from lrdeploy.passes.factorize import factorized_model

    model, layers, decompositions, _, feeds = measured
    layer = layers[4]  # the FFN up-projection: its input is not touched by any other split
    factors = decompositions[layer.name].factors(16)
    injected, error_inputs = error_injected_model(model, [layer])
    delta = {error_inputs[0].weight: (factors.dense_weight() - layer.weight).astype(np.float32),
             error_inputs[0].bias: (factors.bias - layer.bias).astype(np.float32)}
    split = factorized_model(model, layers, {layer.name: factors})
    for a, b in zip(run_model(split, feeds[0]), run_model(injected, {**feeds[0], **delta})):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_measured_degradation_falls_with_rank(measured):
    _, layers, decompositions, table, _ = measured
    assert set(table) == {l.name for l in layers}
    for layer in layers:
        ranks = sorted(table[layer.name])
        assert ranks == candidate_ranks(layer.shape, 16)
        values = [table[layer.name][k] for k in ranks]
        assert all(v >= 0 for v in values) and values[0] > 0
        assert values == sorted(values, reverse=True)
    loss = sensitivity_loss(table, {name: d.energies for name, d in decompositions.items()})
    layer = layers[-1]
    ranks = sorted(table[layer.name])
    assert loss(layer.shape, ranks[0]) == pytest.approx(table[layer.name][ranks[0]])
    assert loss(layer.shape, None) == 0.0


def test_cli_sensitivity_build_respects_budget_and_caches(transformer_files, tmp_path, isolated_cache, monkeypatch):
    import json

    import lrdeploy.stages.sensitivity as sensitivity_module

    model, calib = transformer_files
    args = ["build", str(model), "--calib", str(calib), "--allocation", "sensitivity", "--rank-budget", "0.5"]
    first = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "a"), "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert report["config"]["allocation"] == "sensitivity" and report["params"]["linear_ratio"] <= 0.5
    assert len(list(isolated_cache.glob("*.sensitivity.json"))) == 1

    def must_not_measure(*args, **kwargs):
        raise AssertionError("the cached sensitivity table should have been used")

    monkeypatch.setattr(sensitivity_module, "measure_sensitivity", must_not_measure)
    second = CliRunner().invoke(main, [*args, "-o", str(tmp_path / "b"), "--json"])
    assert second.exit_code == 0, second.output
    assert json.loads(second.stdout)["layers"] == report["layers"]
