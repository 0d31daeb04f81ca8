"""Narrower FFN blocks: matching, and exactness where the maths says the cut loses nothing."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from lrdeploy.calib.stats import TensorRequest, collect_moments
from lrdeploy.lowrank.moments import Moments
from lrdeploy.lowrank.neurons import cut_neurons, neuron_order
from lrdeploy.passes.linear_layers import find_linear_layers
from lrdeploy.passes.prune_ffn import find_ffn_blocks, prune_block
from tests import models
from tests.conftest import run_model

RNG = np.random.default_rng(3)
X = {"x": RNG.standard_normal((600, 16)).astype(np.float32)}


def _pruned(model, keep_count):
    """The model with its FFN cut to `keep_count` neurons (statistics from X); and the block."""
    graph = gs.import_onnx(model)
    (block,) = find_ffn_blocks(graph, find_linear_layers(graph))
    moments = collect_moments(model, [TensorRequest(block.down.input_name, block.width)], lambda: [X], threads=1)
    cut = cut_neurons(moments[block.down.input_name], block.down.weight, block.down.bias, keep_count)
    prune_block(graph, block, cut)
    pruned = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(pruned)
    return pruned, block, cut


@pytest.mark.parametrize("activation", ["Relu", "Gelu"])
def test_neurons_that_contribute_nothing_are_removed_exactly(activation):
    w_down = RNG.standard_normal((48, 16)).astype(np.float32)
    w_down[20:] = 0  # neurons 20..47 never reach the output
    model = models.ffn(RNG.standard_normal((16, 48)), RNG.standard_normal(48), w_down, RNG.standard_normal(16), activation)
    pruned, block, cut = _pruned(model, 20)
    assert block.width == 48 and list(cut.keep) == list(range(20))
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert shapes["up/pruned/weight"] == (16, 20) and shapes["up/pruned/bias"] == (20,)
    assert shapes["down/refit/weight"] == (20, 16) and shapes["down/refit/bias"] == (16,)
    np.testing.assert_allclose(run_model(pruned, X)[0], run_model(model, X)[0], rtol=1e-4, atol=1e-4)


def test_the_refit_is_exact_when_kept_neurons_span_the_removed_ones():
    w_up = RNG.standard_normal((16, 24))
    w_up = np.concatenate([w_up, w_up[:, :8]], 1)  # neurons 24..31 duplicate 0..7 (ReLU keeps them equal)
    b_up = RNG.standard_normal(24)
    model = models.ffn(w_up, np.concatenate([b_up, b_up[:8]]), RNG.standard_normal((32, 16)), RNG.standard_normal(16))
    pruned, _, cut = _pruned(model, 24)
    reference = run_model(model, X)[0]
    assert len(cut.keep) == 24 and cut.residual < 1e-5 * reference.var(0).sum()  # float32 statistics, tiny ridge
    np.testing.assert_allclose(run_model(pruned, X)[0], reference, rtol=1e-3, atol=1e-3)


def test_greedy_selection_keeps_what_matters_and_the_residual_is_the_error():
    h = np.maximum(RNG.standard_normal((4000, 10)), 0) * np.arange(1, 11)  # neuron j's scale grows with j
    w = np.eye(10)
    assert set(neuron_order(np.cov(h.T, bias=True), w, 3)) == {7, 8, 9}
    cut = cut_neurons(Moments(4000.0, h.sum(0), h.T @ h), w, np.zeros(10), 5)
    error = np.mean(((h[:, cut.keep] @ cut.weight + cut.bias - h) ** 2).sum(1))
    assert cut.residual == pytest.approx(error, rel=1e-3)


def test_only_ffn_blocks_match():
    graph = gs.import_onnx(models.transformer(layers=2))
    blocks = find_ffn_blocks(graph, find_linear_layers(graph))
    assert [(b.up.name, b.down.name, b.width) for b in blocks] == [
        ("layer0/intermediate/MatMul", "layer0/output/MatMul", 256), ("layer1/intermediate/MatMul", "layer1/output/MatMul", 256)]


def test_build_narrows_ffn_blocks_and_splits_the_rest(transformer_files, tmp_path):
    import json

    from click.testing import CliRunner

    from lrdeploy.cli import main

    model, calib = transformer_files
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--ffn-keep", "0.5",
                                       "--rank-budget", "0.5", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    narrowed = [l for l in report["layers"] if l["status"] == "narrowed"]
    assert [l["name"] for l in narrowed] == ["layer0/intermediate/MatMul", "layer0/output/MatMul",
                                             "layer1/intermediate/MatMul", "layer1/output/MatMul"]
    assert all(l["reason"] == "128 of 256 FFN neurons kept (--ffn-keep)" and l["params_after"] == 128 * 64
               for l in narrowed)
    factorized = [l for l in report["layers"] if l["status"] == "factorized"]
    assert factorized and all(l["d_in"] == l["d_out"] == 64 for l in factorized)  # Q, K, V, O
    assert report["config"]["ffn_keep"] == 0.5
    assert report["params"]["linear_ratio"] == pytest.approx(report["params"]["linear_after"] /
                                                             report["params"]["linear_before"])
    assert report["params"]["linear_ratio"] < 0.5 + 1e-9
    shapes = {i.name: tuple(i.dims) for i in onnx.load(str(out / "tiny.lowrank.onnx")).graph.initializer}
    assert shapes["layer0/intermediate/MatMul/pruned/weight"] == (64, 128)
    assert shapes["layer0/output/MatMul/refit/weight"] == (128, 64)
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.5


@pytest.mark.parametrize("args, message", [
    (["--ffn-keep", "1.5"], r"--ffn-keep 1.5 is outside \(0, 1\]"),
    (["--ffn-keep", "0.5", "--values-keep", "0"], r"--values-keep 0.0 is outside \(0, 1\]"),
])
def test_bad_ffn_keep_is_one_error_line(transformer_files, tmp_path, args, message):
    import re

    from click.testing import CliRunner

    from lrdeploy.cli import main

    model, calib = transformer_files
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), *args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and re.search(message, result.stderr) and not (tmp_path / "o").exists()


def test_a_down_projection_without_bias_gets_the_refit_bias():
    """Narrowing shifts the mean the down projection sees: without a bias Add of its own, one is added."""
    model = models.ffn(RNG.standard_normal((16, 48)), RNG.standard_normal(48), RNG.standard_normal((48, 16)),
                       np.zeros(16))
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(n for n in nodes if n.name != "down_bias")
    model.graph.node[-1].output[0] = "y"  # the down MatMul now writes y itself
    onnx.checker.check_model(model)
    pruned, _, cut = _pruned(model, 24)
    assert any(n.op_type == "Add" and n.name == "down/added_bias" for n in pruned.graph.node)
    reference, candidate = run_model(model, X)[0], run_model(pruned, X)[0]
    error = np.mean(((candidate - reference) ** 2).sum(1))
    assert error == pytest.approx(cut.residual, rel=0.05)  # exactly the error the refit predicts: bias included
