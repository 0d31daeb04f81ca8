"""Replace chosen linear layers by low-rank pairs.

    X ─MatMul(W[d_in,d_out])─ Add(b) → Y   ⇒   X ─MatMul(A[d_in,k])─ MatMul(B[k,d_out])─ Add(c) → Y

Inside a graph fused by ONNX Runtime the fused op keeps its place and takes the new bias, so every fusion
survives (ONNX Runtime's Attention accepts an input width k different from the hidden size):

    X ─MatMul(W)─► BiasGelu(·, b)          ⇒   X ─MatMul(A)─MatMul(B)─► BiasGelu(·, c)     (likewise SkipLayerNorm)
    X ─Attention(W_qkv, b_qkv)─► context   ⇒   X ─MatMul(A)─► Attention(B, c)─► context

New nodes and initializers are named after the layer (`<layer>/lowrank_a`, `<layer>/lowrank_b`,
`<layer>/lowrank_bias`) so they can be found in Netron and TensorRT layer logs. The output tensor Y
keeps its name, so graph outputs and downstream consumers are untouched. Factors are cast to the
layer's weight dtype (FP16 models stay FP16).
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import InternalError
from lrdeploy.lowrank.decompose import LowRankFactors
from lrdeploy.passes.contract import PassResult, committed
from lrdeploy.passes.linear_layers import FUSED_BIAS_INPUTS, LinearLayer
from lrdeploy.passes.layer_nodes import set_input
from lrdeploy.passes.naming import Scope

FIRST_FACTOR = "lowrank_a"


def first_factor_output(layer_name: str) -> str:
    """The tensor X·A between a split layer's two MatMuls (what a refit of the second factor regresses on)."""
    return Scope(gs.Graph(), layer_name).child(FIRST_FACTOR).name("output")


def _split_layer(graph: gs.Graph, layer: LinearLayer, factors: LowRankFactors, tensors: Mapping[str, gs.Tensor]) -> None:
    x, y = tensors[layer.input_name], tensors[layer.output_name]
    dtype = layer.dtype
    scope = Scope(graph, layer.name)
    first = scope.constant(f"{FIRST_FACTOR}/weight", np.asarray(factors.first, dtype))  # no copy when the dtype is
    second = scope.constant("lowrank_b/weight", np.asarray(factors.second, dtype))  # the model's already
    bias = None if factors.bias is None else scope.constant("lowrank_bias/bias",
                                                            layer.bias_constant(factors.bias).astype(dtype))
    if not layer.output_is_product:  # a fused Attention: it takes the thin input and the second factor
        attention = y.inputs[0]
        attention.inputs[0] = scope.op("MatMul", FIRST_FACTOR, [x, first], dtype=dtype)
        attention.inputs[1] = second
        if bias is not None:
            set_input(attention, 2, bias)
        return
    y.inputs.clear()  # the dense MatMul (and its Add) now feed nothing; cleanup removes them
    middle = scope.op("MatMul", FIRST_FACTOR, [x, first], dtype=dtype)
    if layer.bias_in_consumer is not None:  # the fused consumer adds the new bias
        scope.op("MatMul", "lowrank_b", [middle, second], output=y)
        if bias is not None:
            set_input(y.outputs[0], FUSED_BIAS_INPUTS[layer.bias_in_consumer], bias)
        return
    if factors.bias is None:
        scope.op("MatMul", "lowrank_b", [middle, second], output=y)
        return
    product = scope.op("MatMul", "lowrank_b", [middle, second], dtype=dtype)
    scope.op("Add", "lowrank_bias", [product, bias], output=y)


def factorize_layers(graph: gs.Graph, layers: list[LinearLayer], factors: Mapping[str, LowRankFactors]) -> PassResult:
    """Split every layer named in `factors` (in place) and clean the graph up; other layers stay dense."""
    tensors = graph.tensors()
    split = 0
    for layer in layers:
        if layer.name not in factors:
            continue
        if not layer.eligible:
            raise InternalError(f"layer {layer.name} is not eligible but has factors")
        _split_layer(graph, layer, factors[layer.name], tensors)
        split += 1
    return committed(graph, factorized=split, dense=len(layers) - split)


def factorized_model(original: onnx.ModelProto, layers: list[LinearLayer],
                     factors: Mapping[str, LowRankFactors]) -> onnx.ModelProto:
    """A new model: `original` with the layers named in `factors` split (`original` itself is not changed)."""
    graph = gs.import_onnx(original)
    factorize_layers(graph, layers, factors)
    return gs.export_onnx(graph)
