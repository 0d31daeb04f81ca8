"""Narrower value heads: every head keeps its query/key size h_d but its value/output width becomes r
(`lowrank.value_heads`: W_v^h·W_o^h replaced by its best rank-r product, b_v·W_o folded into b_o).

    X ─ V(W_v[d, H·h_d], b_v) ─Reshape[b,s,H,h_d]─► softmax(QKᵀ/√h_d)·V ─Reshape[b,s,H·h_d]─ O(W_o, b_o) ─► Y
    ⇒  X ─ V(W_v′[d, H·r]) ────Reshape[b,s,H,r]──► softmax(QKᵀ/√h_d)·V ─Reshape[b,s,H·r]──── O(W_o′, b_o′) ─► Y

Plain exports only (Q, K, V as separate MatMuls; ONNX Runtime's fused Attention packs one head size for all
three). The head-size entry of V's Reshape and the context width are rewritten where the graph spells them
(a constant shape, or a one-element piece of a Concat as torch's exporter writes); -1 entries need nothing.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.value_heads import ValueCut
from lrdeploy.passes.contract import PassResult, committed
from lrdeploy.passes.layer_nodes import forget_shapes, matmul_and_add, resize_shape_axis, set_bias
from lrdeploy.passes.naming import Scope
from lrdeploy.passes.prune_heads import AttentionBlock


def shrink_values(graph: gs.Graph, block: AttentionBlock, cut: ValueCut) -> PassResult:
    """Give every head of `block` (plain Q, K, V) the value width `cut.rank` (in place)."""
    tensors = graph.tensors()
    scope = Scope(graph, f"{block.output.name}/values")
    value = block.projections[-1]
    matmul, add = matmul_and_add(tensors, value)
    matmul.inputs[1] = scope.constant("value/weight", cut.value_weight.astype(value.dtype))
    if add is not None:  # the value bias now lives in O's: its Add goes, the MatMul writes the Add's output
        outputs = list(add.outputs)
        add.outputs.clear()
        matmul.outputs = outputs
    elif value.bias is not None:  # a bias held by a fused consumer: zero it there
        set_bias(graph, value, scope.constant("value/bias", np.zeros(cut.value_weight.shape[1], value.dtype)))
    for consumer in tensors[value.output_name].outputs:
        if consumer.op == "Reshape":
            resize_shape_axis(scope, "value/shape", consumer, block.head_dim, cut.rank, 3)
    context = tensors[block.output.input_name]
    if context.inputs and context.inputs[0].op == "Reshape":
        resize_shape_axis(scope, "context/shape", context.inputs[0], block.width, cut.value_weight.shape[1], -1)
    output, _ = matmul_and_add(tensors, block.output)
    output.inputs[1] = scope.constant("output/weight", cut.output_weight.astype(block.output.dtype))
    set_bias(graph, block.output, scope.constant("output/bias", cut.output_bias.astype(block.output.dtype)))
    forget_shapes(graph, [matmul.outputs[0]], {block.output.output_name})
    return committed(graph, value_features_removed=block.width - cut.value_weight.shape[1])
