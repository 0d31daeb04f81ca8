import numpy as np
import onnx_graphsurgeon as gs
import pytest

from lrdeploy.passes.linear_layers import find_linear_layers
from tests import models


def _only_layer(model, **kwargs):
    layers = find_linear_layers(gs.import_onnx(model), **kwargs)
    assert len(layers) == 1
    return layers[0]


@pytest.mark.parametrize("bias_first", [False, True])
def test_matmul_add_bias_on_either_side(bias_first):
    model = models.matmul_add(bias_first=bias_first)
    layer = _only_layer(model)
    assert (layer.pattern, layer.d_in, layer.d_out, layer.eligible) == ("MatMul+Add", 64, 96, True)
    assert layer.output_name == "y" and layer.input_name == "x"
    np.testing.assert_array_equal(layer.bias, np.asarray(gs.import_onnx(model).tensors()["b"].values))


@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_weight_is_normalised_to_d_in_by_d_out(trans_b):
    layer = _only_layer(models.gemm(trans_b=trans_b, alpha=0.5, beta=2.0))
    expected = models.random_weight(64, 96, 0) * 0.5
    np.testing.assert_allclose(layer.weight, expected, rtol=1e-6)
    assert layer.pattern == "Gemm" and layer.bias is not None


def test_weight_behind_transpose_of_constant():
    layer = _only_layer(models.matmul_add(transposed_weight=True))
    assert layer.pattern == "MatMul(Transpose)+Add"
    np.testing.assert_allclose(layer.weight, models.random_weight(64, 96, 0))


def test_fp16_weight_keeps_its_dtype():
    assert _only_layer(models.matmul_add(dtype=np.float16)).dtype == np.float16


def test_activation_matmul_is_skipped_with_reason():
    layer = _only_layer(models.activation_matmul())
    assert not layer.eligible and layer.reason == "weight is not constant (activation × activation)"


def test_layer_too_small_for_rank_multiple_is_skipped():
    layer = _only_layer(models.matmul_add(d_in=16, d_out=16), rank_multiple=16)
    assert not layer.eligible
    assert layer.reason == "too small: rank 16 would not save parameters (16×16)"


def test_transformer_layers_in_model_order():
    layers = find_linear_layers(gs.import_onnx(models.transformer(layers=2)))
    eligible = [l.name for l in layers if l.eligible]
    assert len(eligible) == 12 and len(layers) == 16
    assert eligible[:6] == [f"layer0/{n}/MatMul" for n in
                            ("attention/query", "attention/key", "attention/value", "attention/output",
                             "intermediate", "output")]
    q, k = layers[0], layers[1]
    assert q.input_name == k.input_name  # Q and K read one tensor, so they share one input Gram
