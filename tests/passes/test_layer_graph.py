"""The tiny timing graphs: one dense layer, or its split, with the shapes and names a timing feed expects."""

import numpy as np
import onnx

from lrdeploy.passes.layer_graph import INPUT, layer_model
from tests.conftest import run_model


def test_layer_models_have_the_right_structure_and_shapes():
    dense, split = layer_model(64, 96, None), layer_model(64, 96, 16)
    assert [n.op_type for n in dense.graph.node] == ["MatMul", "Add"]
    assert [n.op_type for n in split.graph.node] == ["MatMul", "MatMul", "Add"]
    assert {i.name: tuple(i.dims) for i in split.graph.initializer} == {
        "layer/A": (64, 16), "layer/B": (16, 96), "layer/b": (96,)}
    for model in (dense, split):
        onnx.checker.check_model(model)
        assert model.opset_import[0].version == 17 and model.ir_version == 8
    x = np.ones((5, 64), np.float32)
    assert run_model(split, {INPUT: x})[0].shape == run_model(dense, {INPUT: x})[0].shape == (5, 96)
