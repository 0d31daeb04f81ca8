"""Remove attention heads: keep k of a self-attention's H heads (head dim h_d = d / H).

    X ─┬─ Q(W_q[d,d]) ─Reshape[b,s,H,h_d]─┐
       ├─ K(W_k[d,d]) ─Reshape[b,s,H,h_d]─┼─ softmax(QKᵀ/√h_d)·V ─Reshape[b,s,d]─ O(W_o[d,d], b_o) ─► Y
       └─ V(W_v[d,d]) ─Reshape[b,s,H,h_d]─┘
    ⇒  W_q, W_k, W_v (and biases) keep the kept heads' columns, shape constants say k heads (or k·h_d wide),
       W_o keeps their rows refit by least squares to reproduce Y (`lowrank.neurons.cut_groups`).

Matched on plain exports (three MatMul(+Add) layers reading one tensor, then the output projection reading the
merged context); a Reshape whose target shape is computed (torch's exporter writes -1 for the head axis)
needs no change, a constant one is replaced per block. Matching only reads the graph.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.neurons import NeuronCut
from lrdeploy.passes.layer_nodes import forget_shapes, is_plain, matmul_and_add, set_bias
from lrdeploy.passes.linear_layers import LinearLayer, constant_value
from lrdeploy.passes.naming import Scope


@dataclass
class AttentionBlock:
    """The Q, K, V projections of one self-attention, its output projection, and its head geometry."""

    query: LinearLayer
    key: LinearLayer
    value: LinearLayer
    output: LinearLayer
    heads: int

    @property
    def head_dim(self) -> int:
        return self.value.d_out // self.heads


def find_attention_blocks(layers: list[LinearLayer], heads: int) -> list[AttentionBlock]:
    """Blocks of three plain layers reading one tensor with equal widths divisible by `heads`, each followed (in
    model order) by the output projection reading a tensor of that width."""
    plain = [layer for layer in layers if is_plain(layer)]
    blocks = []
    for index, layer in enumerate(plain):
        readers = [other for other in plain[index:index + 3] if other.input_name == layer.input_name]
        if len(readers) != 3 or any(r.d_out != layer.d_out for r in readers) or layer.d_out % heads:
            continue
        if blocks and layer in (blocks[-1].query, blocks[-1].key, blocks[-1].value):
            continue
        following = plain[index + 3] if index + 3 < len(plain) else None
        if following is not None and following.d_in == layer.d_out and following.input_name != layer.input_name:
            blocks.append(AttentionBlock(*readers, following, heads))
    return blocks


def _resized_shape(scope: Scope, name: str, node: gs.Node, old: int, new: int, axis: int) -> None:
    """Give the Reshape `node` its own target-shape constant with `old` → `new` at `axis` (a computed shape,
    e.g. with -1 there, is left as it is)."""
    found = constant_value(node.inputs[1])
    if found is None:
        return
    values = np.array(found[0])
    if values[axis] == old:
        values[axis] = new
        node.inputs[1] = scope.constant(name, values)


def prune_heads(graph: gs.Graph, block: AttentionBlock, kept_heads: list[int], cut: NeuronCut) -> None:
    """Keep the heads `kept_heads` of `block` (in place); `cut` holds their context features and W_o's refit."""
    tensors = graph.tensors()
    features, width, dtype = cut.keep, len(cut.keep), block.value.dtype
    narrowed = [matmul_and_add(tensors, layer)[0].outputs[0] for layer in (block.query, block.key, block.value)]
    scope = Scope(graph, f"{block.output.name}/heads")
    for tag, layer in (("query", block.query), ("key", block.key), ("value", block.value)):
        matmul, _ = matmul_and_add(tensors, layer)
        matmul.inputs[1] = scope.constant(f"{tag}/weight", np.asarray(layer.weight)[:, features].astype(dtype))
        if layer.bias is not None:
            set_bias(graph, layer, scope.constant(f"{tag}/bias", np.asarray(layer.bias)[features].astype(dtype)))
        for consumer in tensors[layer.output_name].outputs:
            if consumer.op == "Reshape":
                _resized_shape(scope, f"{tag}/shape", consumer, block.heads, len(kept_heads), 2)
    context = tensors[block.output.input_name]
    if context.inputs and context.inputs[0].op == "Reshape":
        _resized_shape(scope, "context/shape", context.inputs[0], block.value.d_out, width, -1)
    matmul, _ = matmul_and_add(tensors, block.output)
    matmul.inputs[1] = scope.constant("output/weight", cut.weight.astype(dtype))
    set_bias(graph, block.output, scope.constant("output/bias", cut.bias.astype(dtype)))
    forget_shapes(graph, narrowed, {block.output.output_name})
