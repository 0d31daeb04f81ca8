"""Replace chosen linear layers by low-rank pairs.

    X ─MatMul(W[d_in,d_out])─ Add(b) → Y   ⇒   X ─MatMul(A[d_in,k])─ MatMul(B[k,d_out])─ Add(c) → Y

New nodes and initializers are named after the layer (`<layer>/lowrank_a`, `<layer>/lowrank_b`,
`<layer>/lowrank_bias`) so they can be found in Netron and TensorRT layer logs. The output tensor Y
keeps its name, so graph outputs and downstream consumers are untouched. Factors are cast to the
layer's weight dtype (FP16 models stay FP16).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.errors import InternalError
from lrdeploy.lowrank.decompose import LowRankFactors
from lrdeploy.passes.linear_layers import LinearLayer


@dataclass
class PassResult:
    changed: bool
    counts: dict[str, int] = field(default_factory=dict)


def _split_layer(graph: gs.Graph, layer: LinearLayer, factors: LowRankFactors,
                 nodes: Mapping[str, gs.Node], tensors: Mapping[str, gs.Tensor]) -> None:
    x = tensors[layer.input_name]
    y = tensors[layer.output_name]
    dtype = layer.dtype
    for node_name in layer.node_names:
        nodes[node_name].outputs.clear()
    a = gs.Constant(f"{layer.name}/lowrank_a/weight", np.ascontiguousarray(factors.first.astype(dtype)))
    b = gs.Constant(f"{layer.name}/lowrank_b/weight", np.ascontiguousarray(factors.second.astype(dtype)))
    middle = gs.Variable(f"{layer.name}/lowrank_a/output", dtype=dtype)
    graph.nodes.append(gs.Node("MatMul", f"{layer.name}/lowrank_a", inputs=[x, a], outputs=[middle]))
    if factors.bias is None:
        graph.nodes.append(gs.Node("MatMul", f"{layer.name}/lowrank_b", inputs=[middle, b], outputs=[y]))
        return
    product = gs.Variable(f"{layer.name}/lowrank_b/output", dtype=dtype)
    bias = gs.Constant(f"{layer.name}/lowrank_bias/bias", np.ascontiguousarray(factors.bias.astype(dtype)))
    graph.nodes.append(gs.Node("MatMul", f"{layer.name}/lowrank_b", inputs=[middle, b], outputs=[product]))
    graph.nodes.append(gs.Node("Add", f"{layer.name}/lowrank_bias", inputs=[product, bias], outputs=[y]))


def factorize_layers(graph: gs.Graph, layers: list[LinearLayer], factors: Mapping[str, LowRankFactors]) -> PassResult:
    """Split every layer named in `factors` (in place) and clean the graph up; other layers stay dense."""
    nodes = {node.name: node for node in graph.nodes}
    tensors = graph.tensors()
    split = 0
    for layer in layers:
        if layer.name not in factors:
            continue
        if not layer.eligible:
            raise InternalError(f"layer {layer.name} is not eligible but has factors")
        _split_layer(graph, layer, factors[layer.name], nodes, tensors)
        split += 1
    graph.cleanup().toposort()
    return PassResult(changed=split > 0, counts={"factorized": split, "dense": len(layers) - split})
