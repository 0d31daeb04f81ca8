"""The nodes of a plain linear layer (MatMul by a constant, optional bias Add; or a Gemm, as torch's legacy exporter
writes GPT-2's Conv1D) in a graph, for passes that rewrite its weights in place (`prune_ffn`, `prune_heads`):
finding them reads only; `set_weight`, `set_bias` and `replace_input` edit."""

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


def is_sliceable(layer: LinearLayer) -> bool:
    """A plain layer, or a Gemm with a constant weight: the forms whose neurons an FFN cut can slice."""
    return is_plain(layer) or (layer.pattern == "Gemm" and layer.weight is not None)


def set_weight(node: gs.Node, weight: gs.Constant) -> None:
    """Make `weight` ([d_in, d_out], as `LinearLayer.weight`) the weight of the layer's MatMul or Gemm, stored as
    the node reads it: a Gemm's B transposed under transB and divided by alpha."""
    if node.op == "Gemm":
        alpha = float(node.attrs.get("alpha", 1.0))
        values = np.asarray(weight.values)
        weight.values = ((values.T if node.attrs.get("transB", 0) else values) / alpha).astype(values.dtype)
    node.inputs[1] = weight


def set_bias(graph: gs.Graph, layer: LinearLayer, bias: gs.Constant) -> None:
    """Make `bias` the layer's bias wherever it lives: its Add, a Gemm's C (divided by beta), the fused consumer's
    bias input, or a new Add after the MatMul (named after the layer) when it had none."""
    tensors = graph.tensors()
    matmul, add = matmul_and_add(tensors, layer)
    if matmul.op == "Gemm":
        beta = float(matmul.attrs.get("beta", 1.0))
        bias.values = (np.asarray(bias.values) / beta).astype(np.asarray(bias.values).dtype)
        set_input(matmul, 2, bias)
        return
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
    """The MatMul (or Gemm) node of a sliceable layer, and its bias Add (None without one, or in the Gemm)."""
    producer = tensors[layer.output_name].inputs[0]
    if producer.op in ("MatMul", "Gemm"):
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


def resize_shape_axis(scope: Scope, name: str, node: gs.Node, old: int | None, new: int, axis: int) -> None:
    """Give the Reshape (or Expand) `node` a target shape with `old` → `new` at `axis`: a constant shape gets its own copy; a
    shape concatenated from one-element pieces (torch's exporter: Concat(batch, seq, [-1], [32])) gets its own
    piece there. `old` None replaces a computed piece (one read from a tensor's shape at run time); otherwise a
    computed entry is left as it is."""
    found = constant_value(node.inputs[1])
    if found is not None:
        values = np.array(found[0])
        if values[axis] == old:
            values[axis] = new
            node.inputs[1] = scope.constant(name, values)
        return
    concat = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
    if concat is None or concat.op != "Concat":
        return
    pieces = list(concat.inputs)
    value = constant_value(pieces[axis % len(pieces)])
    current = None if value is None else np.asarray(value[0]).reshape(-1).tolist()
    if current != (None if old is None else [old]):
        return
    dtype = np.int64 if value is None else np.asarray(value[0]).dtype
    pieces[axis % len(pieces)] = scope.constant(name, np.asarray([new], dtype))
    node.inputs[1] = scope.op("Concat", f"{name}/concat", pieces, dict(concat.attrs))  # its own: others keep theirs
