"""The nodes of a plain linear layer (MatMul by a constant, optional bias Add) in a graph, for passes that
rewrite its weights in place (`prune_ffn`, `prune_heads`): finding them reads only; `replace_input` and
`set_bias` edit."""

from __future__ import annotations

from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.linear_layers import FUSED_BIAS_INPUTS, LinearLayer, constant_value
from lrdeploy.passes.naming import Scope


SLICEABLE = ("MatMul", "MatMul+Add", "MatMul+BiasGelu", "MatMul+SkipLayerNormalization")


def is_plain(layer: LinearLayer) -> bool:
    """A MatMul by a constant weight whose bias, if any, an Add or a fused consumer adds: the forms whose
    weights structured passes can slice."""
    return layer.weight is not None and layer.pattern in SLICEABLE


def set_bias(graph: gs.Graph, layer: LinearLayer, bias: gs.Constant) -> None:
    """Make `bias` the layer's bias wherever it lives: its Add, the fused consumer's bias input, or a new Add
    after the MatMul (named after the layer) when it had none."""
    tensors = graph.tensors()
    matmul, add = matmul_and_add(tensors, layer)
    if add is not None:
        old = next(t for t in add.inputs if constant_value(t) is not None)
        bias.values = layer.bias_constant(bias.values)  # the graph's broadcast shape, e.g. [1, 1, n]
        replace_input(add, old, bias)
        return
    consumer = layer.bias_in_consumer
    if consumer is not None:
        set_input(tensors[layer.output_name].outputs[0], FUSED_BIAS_INPUTS[consumer], bias)
        return
    scope = Scope(graph, layer.name)
    output = matmul.outputs[0]
    product = scope.variable("product", output.dtype)
    matmul.outputs = [product]
    scope.op("Add", "added_bias", [product, bias], output=output)


def matmul_and_add(tensors: Mapping[str, gs.Tensor], layer: LinearLayer) -> tuple[gs.Node, gs.Node | None]:
    """The MatMul node of a plain layer, and its bias Add (None without one)."""
    producer = tensors[layer.output_name].inputs[0]
    if producer.op == "MatMul":
        return producer, None
    product = next(t for t in producer.inputs if t.inputs and t.inputs[0].op == "MatMul")
    return product.inputs[0], producer


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """`node` reads `tensor` as input `index`, optional inputs before it left empty."""
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = tensor


def replace_input(node: gs.Node, old: gs.Tensor, new: gs.Tensor) -> None:
    """`node` reads `new` where it read `old`."""
    node.inputs[[i for i, t in enumerate(node.inputs) if t is old][0]] = new


def forget_shapes(graph: gs.Graph, starts: list[gs.Tensor], until: set[str]) -> None:
    """Drop the recorded shape of every tensor downstream of `starts` up to (not including) the tensors named
    `until`: a pass that narrows a tensor makes those shapes stale, and torch's dynamo exporter records one for
    every intermediate tensor (ONNX Runtime then refuses the model: "Incompatible dimensions"). Graph outputs
    keep theirs; the runtime infers the rest."""
    keep = until | {t.name for t in graph.outputs}
    frontier, seen = list(starts), set()
    while frontier:
        tensor = frontier.pop()
        if tensor.name in keep or tensor.name in seen or not isinstance(tensor, gs.Variable):
            continue
        seen.add(tensor.name)
        tensor.shape = None
        frontier += [out for node in tensor.outputs for out in node.outputs]


def reshape_target_dims(node: gs.Node) -> list[int | None] | None:
    """The target shape of a Reshape as far as constants say (None for computed entries)."""
    shape = node.inputs[1] if len(node.inputs) > 1 else None
    if isinstance(shape, gs.Constant):
        return [int(v) for v in np.asarray(shape.values).reshape(-1)]
    producer = shape.inputs[0] if shape is not None and shape.inputs else None
    if producer is None or producer.op != "Concat":
        return None
    dims: list[int | None] = []
    for part in producer.inputs:
        value = part.values if isinstance(part, gs.Constant) else (
            part.inputs[0].attrs.get("value").values if part.inputs and part.inputs[0].op == "Constant" else None)
        dims += [None] if value is None else [int(v) for v in np.asarray(value).reshape(-1)]
    return dims
