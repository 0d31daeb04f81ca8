"""`--qkv joint`: Q, K and V merged into one layer (exact), split with one shared basis."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from lrdeploy.cli import main
from lrdeploy.lowrank.decompose import decompose
from lrdeploy.lowrank.moments import Moments
from lrdeploy.passes.linear_layers import find_linear_layers
from lrdeploy.passes.merge_qkv import find_qkv_groups, merged_name, merged_qkv_model
from tests import models
from tests.conftest import run_model

INPUTS = models.transformer_inputs(32)


def test_merging_is_exact_and_names_the_merged_layer():
    model = models.transformer(layers=2)
    graph = gs.import_onnx(model)
    layers = find_linear_layers(graph)
    groups = find_qkv_groups(layers)
    assert [merged_name(group) for group in groups] == ["layer0/attention/qkv", "layer1/attention/qkv"]
    merged = merged_qkv_model(graph, layers)
    onnx.checker.check_model(merged)
    ops = [node.op_type for node in merged.graph.node]
    assert ops.count("MatMul") == sum(n.op_type == "MatMul" for n in model.graph.node) - 4 and ops.count("Split") == 2
    after = {layer.name: (layer.d_in, layer.d_out) for layer in find_linear_layers(gs.import_onnx(merged))}
    assert after["layer0/attention/qkv/MatMul"] == (64, 192) and "layer0/attention/query/MatMul" not in after
    for want, got in zip(run_model(model, INPUTS), run_model(merged, INPUTS)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _attention_like(opset: int) -> onnx.ModelProto:
    """X → Q, K, V (MatMul+Add) → Q+K+V → output projection: the smallest graph the matcher accepts."""
    rng = np.random.default_rng(0)
    inits, nodes = [], []
    for name in ("q", "k", "v", "o"):
        inits += [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), f"{name}.w"),
                  numpy_helper.from_array(rng.standard_normal(8).astype(np.float32), f"{name}.b")]
    for name in ("q", "k", "v"):
        nodes += [helper.make_node("MatMul", ["x", f"{name}.w"], [f"{name}.mm"], name=f"{name}/MatMul"),
                  helper.make_node("Add", [f"{name}.mm", f"{name}.b"], [name], name=f"{name}/Add")]
    nodes += [helper.make_node("Add", ["q", "k"], ["qk"]), helper.make_node("Add", ["qk", "v"], ["qkv"]),
              helper.make_node("MatMul", ["qkv", "o.w"], ["o.mm"], name="o/MatMul"),
              helper.make_node("Add", ["o.mm", "o.b"], ["y"], name="o/Add")]
    graph = helper.make_graph(nodes, "attention_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    return model


@pytest.mark.parametrize("opset", [12, 17])  # Split takes its widths as an attribute below opset 13
def test_merging_writes_split_for_the_models_opset(opset):
    model = _attention_like(opset)
    graph = gs.import_onnx(model)
    merged = merged_qkv_model(graph, find_linear_layers(graph, rank_multiple=1))
    onnx.checker.check_model(merged)
    assert [n.op_type for n in merged.graph.node].count("Split") == 1
    x = {"x": np.random.default_rng(1).standard_normal((5, 8)).astype(np.float32)}
    np.testing.assert_allclose(run_model(merged, x)[0], run_model(model, x)[0], rtol=1e-5, atol=1e-5)


def test_a_joint_split_is_one_basis_from_the_concatenated_outputs():
    """The merged layer's PCA is the PCA of the concatenated outputs [Q|K|V]: its second factor's rows span their
    covariance's top eigenvectors (one basis; three separate splits would have three)."""
    graph = gs.import_onnx(models.transformer(layers=1))
    layers = find_linear_layers(graph)
    q, k, v = find_qkv_groups(layers)[0]
    merged = {layer.name: layer for layer in find_linear_layers(gs.import_onnx(merged_qkv_model(graph, layers)))}
    joint = merged["layer0/attention/qkv/MatMul"]
    np.testing.assert_array_equal(joint.weight, np.concatenate([q.weight, k.weight, v.weight], axis=1))
    x = np.random.default_rng(2).standard_normal((500, 64))
    moments = Moments.zeros(64).add(len(x), x.sum(0), x.T @ x)
    factors = decompose("pca", joint.weight, joint.bias, moments).factors(32)
    assert factors.first.shape == (64, 32) and factors.second.shape == (32, 192)
    y = x @ joint.weight
    covariance = np.cov(y, rowvar=False, bias=True)  # feature PCA centres the outputs
    top = np.linalg.eigh(covariance)[1][:, ::-1][:, :32]
    projected = factors.second.T @ np.linalg.pinv(factors.second.T)
    np.testing.assert_allclose(projected @ top, top, atol=1e-6)


def test_build_qkv_joint_splits_one_layer_per_attention(transformer_files, tmp_path):
    model, calib = transformer_files
    runner = CliRunner()
    reports = {}
    for form in ("separate", "joint"):
        result = runner.invoke(main, ["build", str(model), "--calib", str(calib), "--rank-budget", "0.5",
                                      "--allocation", "sensitivity", "--qkv", form, "-o", str(tmp_path / form), "--json"])
        assert result.exit_code == 0, result.output
        reports[form] = json.loads(result.stdout)
    joint = reports["joint"]
    assert joint["config"]["qkv"] == "joint" and reports["separate"]["config"]["qkv"] == "separate"
    names = {layer["name"]: layer for layer in joint["layers"]}
    assert names["layer0/attention/qkv/MatMul"]["d_out"] == 192 and "layer0/attention/query/MatMul" not in names
    assert joint["params"]["linear_before"] == reports["separate"]["params"]["linear_before"]
    assert joint["params"]["linear_ratio"] <= 0.5 + 1e-9
    assert joint["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.9
    proto = onnx.load(str(tmp_path / "joint" / "tiny.lowrank.onnx"))
    assert {p.key: p.value for p in proto.metadata_props}["lrdeploy.qkv"] == "joint"


@pytest.mark.parametrize("args, message", [
    (["--qkv", "joint", "--heads-keep", "0.5"], "--qkv joint cannot be combined with --heads-keep yet"),
    (["--qkv", "joint", "--plan", "unified"], "--qkv joint cannot be combined with --plan unified yet"),
    (["--qkv", "separate", "--optimize", "ort"], "--qkv separate cannot be combined with --optimize ort"),
])
def test_qkv_conflicts_are_one_error_line(transformer_files, tmp_path, args, message):
    model, calib = transformer_files
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), *args, "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and message in result.output
    assert not (tmp_path / "o").exists()
