"""The sensitivity graph: a copy of the model in which chosen linear layers get an error fed at run time.

Each layer L gets two new graph inputs, a weight error D_L [d_in, d_out] and a bias error e_L [d_out], added
to its output:

    X_L ─MatMul(W)─Add(b)─► Y_L      ⇒      X_L ─MatMul(W)─Add(b)─► Y′_L ─Add─► Y_L
                                              X_L ─MatMul(D_L)─Add(e_L)──┘

Y_L keeps its name, so every consumer reads the perturbed value. A fused Attention has no Y_L tensor; its packed
weight and bias take the error instead (the same thing, as X·(W + D) = X·W + X·D):

    X ─Attention(W, b)─►   ⇒   X ─Attention(Add(W, D_L), Add(b, e_L))─►

Feeding zeros reproduces the model; feeding D_L = A·B − W, e_L = c − b reproduces the model with L alone
replaced by a low-rank pair.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.naming import Scope

SCOPE = "lrdeploy_sens"


@dataclass(frozen=True)
class ErrorInputs:
    """The names of the two inputs that carry one layer's injected error."""

    weight: str
    bias: str

    def zeros(self, layer: LinearLayer) -> dict[str, np.ndarray]:
        """A feed that injects nothing into `layer`."""
        return {self.weight: np.zeros((layer.d_in, layer.d_out), layer.dtype),
                self.bias: np.zeros(layer.d_out, layer.dtype)}


def error_injected_model(model: onnx.ModelProto, layers: list[LinearLayer]) -> tuple[onnx.ModelProto, list[ErrorInputs]]:
    """A new model with an injectable error on each of `layers`, and the names of its error inputs per layer."""
    graph = gs.import_onnx(model)
    tensors = graph.tensors()
    inputs = []
    for index, layer in enumerate(layers):
        scope = Scope(graph, f"{SCOPE}/{index}")
        y, x = tensors[layer.output_name], tensors[layer.input_name]
        delta_w = scope.add_input("weight_error", layer.dtype, [layer.d_in, layer.d_out])
        delta_b = scope.add_input("bias_error", layer.dtype, [layer.d_out])
        inputs.append(ErrorInputs(delta_w.name, delta_b.name))
        if not layer.output_is_product:
            attention = y.inputs[0]
            attention.inputs[1] = scope.op("Add", "perturbed_weight", [attention.inputs[1], delta_w])
            has_bias = len(attention.inputs) > 2 and attention.inputs[2].name
            bias = scope.op("Add", "perturbed_bias", [attention.inputs[2], delta_b]) if has_bias else delta_b
            if has_bias:
                attention.inputs[2] = bias
            else:
                attention.inputs[2:] = [bias, *attention.inputs[3:]]
            continue
        dense = scope.variable("dense_output", y.dtype)
        for producer in list(y.inputs):
            producer.outputs = [dense if t is y else t for t in producer.outputs]
        error = scope.op("Add", "error", [scope.op("MatMul", "input_error", [x, delta_w]), delta_b])
        scope.op("Add", "perturbed", [dense, error], output=y)
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False), inputs


def perturbable_model(model: onnx.ModelProto, tensors: list[str], types: Mapping[str, onnx.TypeProto]
                      ) -> tuple[onnx.ModelProto, list[str]]:
    """A new model in which each of `tensors` gets a change fed at run time (an input of its type and shape in
    `types`, added to it: feeding zeros reproduces the model), and the names of those inputs in order:

        ─► T      ⇒      ─► T′ ─Add─► T ─► (every consumer)
                       change_T ──┘
    """
    graph = gs.import_onnx(model)
    found = graph.tensors()
    inputs = []
    for index, name in enumerate(tensors):
        scope = Scope(graph, f"{SCOPE}/change{index}")
        tensor, tensor_type = found[name], types[name].tensor_type
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type)
        shape = [dim.dim_value if dim.HasField("dim_value") else (dim.dim_param or f"{name}_dim{axis}")
                 for axis, dim in enumerate(tensor_type.shape.dim)]
        change = scope.add_input("change", dtype, shape)
        inputs.append(change.name)
        dense = scope.variable("dense", dtype)
        for producer in list(tensor.inputs):
            producer.outputs = [dense if t is tensor else t for t in producer.outputs]
        scope.op("Add", "changed", [dense, change], output=tensor)
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False), inputs
