"""The rewrite: structure of the emitted graph and numerical equivalence on ONNX Runtime."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

from lrdeploy.calib.stats import TensorRequest, collect_moments
from lrdeploy.lowrank.decompose import decompose
from lrdeploy.passes.factorize import factorize_layers
from lrdeploy.passes.linear_layers import find_linear_layers
from tests import models
from tests.conftest import run_model


def _compress(model, feeds, rank_of, method="pca", mask_name=None):
    """Factorize every eligible layer at rank_of(layer); returns (compressed ModelProto, layers)."""
    graph = gs.import_onnx(model)
    layers = [l for l in find_linear_layers(graph) if l.eligible]
    moments = collect_moments(model, [TensorRequest(l.input_name, l.d_in) for l in layers], lambda: [feeds],
                              mask_name=mask_name, threads=1)
    factors = {l.name: decompose(method, l.weight, l.bias, moments[l.input_name]).factors(rank_of(l)) for l in layers}
    result = factorize_layers(graph, find_linear_layers(graph), factors)
    assert result.counts["factorized"] == len(layers)
    compressed = gs.export_onnx(graph)
    onnx.checker.check_model(compressed)
    return compressed, layers


def _rel_error(a, b):
    return float(np.linalg.norm(a.astype(np.float64) - b) / np.linalg.norm(a.astype(np.float64)))


X = {"x": np.random.default_rng(7).standard_normal((200, 64)).astype(np.float32)}
SINGLE_LAYER_MODELS = {
    "matmul+add": models.matmul_add(),
    "add(bias first)": models.matmul_add(bias_first=True),
    "matmul, no bias": models.matmul_add(with_bias=False),
    "gemm transB=0": models.gemm(trans_b=0),
    "gemm transB=1": models.gemm(trans_b=1, alpha=0.7, beta=1.3),
    "transposed weight": models.matmul_add(transposed_weight=True),
}


@pytest.mark.parametrize("name", list(SINGLE_LAYER_MODELS))
@pytest.mark.parametrize("method", ["pca", "svd", "whiten"])
def test_full_rank_split_matches_original(name, method):
    model = SINGLE_LAYER_MODELS[name]
    compressed, _ = _compress(model, X, lambda l: min(l.d_in, l.d_out), method)
    (reference,), (candidate,) = run_model(model, X), run_model(compressed, X)
    assert _rel_error(reference, candidate) <= 1e-4


def test_rewrite_structure_and_names():
    compressed, _ = _compress(models.matmul_add(), X, lambda l: 32)
    ops = [n.op_type for n in compressed.graph.node]
    assert ops == ["MatMul", "MatMul", "Add"]
    assert [n.name for n in compressed.graph.node] == ["fc/lowrank_a", "fc/lowrank_b", "fc/lowrank_bias"]
    shapes = {i.name: tuple(i.dims) for i in compressed.graph.initializer}
    assert shapes == {"fc/lowrank_a/weight": (64, 32), "fc/lowrank_b/weight": (32, 96), "fc/lowrank_bias/bias": (96,)}
    assert compressed.graph.output[0].name == "y"


def test_transpose_of_weight_is_removed():
    compressed, _ = _compress(models.matmul_add(transposed_weight=True), X, lambda l: 32)
    assert "Transpose" not in [n.op_type for n in compressed.graph.node]
    assert "W_t" not in {i.name for i in compressed.graph.initializer}


def test_pca_reproduces_truly_low_rank_outputs_exactly():
    weight = models.random_weight(64, 96, seed=3, rank=8)
    model = models.matmul_add(weight=weight)
    compressed, _ = _compress(model, X, lambda l: 8)
    (reference,), (candidate,) = run_model(model, X), run_model(compressed, X)
    assert _rel_error(reference, candidate) <= 1e-5


def test_fp16_model_stays_fp16_and_accurate_at_full_rank():
    model = models.matmul_add(dtype=np.float16)
    feeds = {"x": X["x"].astype(np.float16)}
    compressed, _ = _compress(model, feeds, lambda l: 64)
    assert {i.data_type for i in compressed.graph.initializer} == {onnx.TensorProto.FLOAT16}
    (reference,), (candidate,) = run_model(model, feeds), run_model(compressed, feeds)
    assert candidate.dtype == np.float16
    assert _rel_error(reference, candidate) <= 2e-3  # fp16 rounding of two factors instead of one weight


def test_two_layer_transformer_full_rank_matches():
    model = models.transformer(layers=2)
    feeds = models.transformer_inputs(32)
    compressed, layers = _compress(model, feeds, lambda l: min(l.d_in, l.d_out), mask_name="attention_mask")
    assert len(layers) == 12
    assert sum(n.op_type == "MatMul" for n in compressed.graph.node) == 24 + 4  # 12 pairs + attention
    for reference, candidate in zip(run_model(model, feeds), run_model(compressed, feeds)):
        assert _rel_error(reference, candidate) <= 1e-4
