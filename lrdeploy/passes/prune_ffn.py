"""Narrow FFN blocks: keep k of their f intermediate neurons.

    X ─MatMul(W_up[d,f])─Add(b_up)─ act ─► H[…,f] ─MatMul(W_down[f,d])─Add(b_down)─► Y
        ⇒  X ─MatMul(W_up[:,S])─Add(b_up[S])─ act ─► H_S[…,k] ─MatMul(W′[k,d])─Add(b′)─► Y

`act` is any chain of per-neuron ops (GELU as Div/Erf/Add/Mul, ReLU, tanh, …, or ONNX Runtime's BiasGelu,
which then carries b_up) whose other inputs are scalars, so slicing neurons commutes with it. W′ and b′ come
from `lowrank.neurons.cut_neurons` (the refit that reproduces Y from the kept neurons). Matching only reads the
graph; a block that does not fit says why.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.neurons import NeuronCut
from lrdeploy.passes.contract import Matches, PassResult, committed
from lrdeploy.passes.linear_layers import LinearLayer, constant_value
from lrdeploy.passes.layer_nodes import forget_shapes, is_plain, matmul_and_add, set_bias
from lrdeploy.passes.naming import Scope

PER_NEURON_OPS = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu", "BiasGelu",
                  "Pow", "Sqrt", "Identity", "Cast", "LeakyRelu", "Elu", "Softplus"}


@dataclass
class FfnBlock:
    """An up projection, the per-neuron activation after it, and the down projection reading its output."""

    up: LinearLayer
    down: LinearLayer

    @property
    def width(self) -> int:
        return self.up.d_out


def _is_scalar(tensor: gs.Tensor) -> bool:
    """A one-element constant: an initializer, or a Constant node's output (what torch's exporter writes)."""
    found = constant_value(tensor)
    return found is not None and found[0].size == 1


def _activation_path(start: gs.Tensor, target: str, width: int, graph_outputs: set[str]) -> str | None:
    """Why the way from `start` to the tensor named `target` is not a per-neuron activation (None when it is:
    per-neuron ops whose other inputs are scalars, or BiasGelu's [width] bias, with no other way out)."""
    nodes: dict[int, gs.Node] = {}
    frontier = [start]
    while frontier:
        tensor = frontier.pop()
        if tensor.name == target:
            continue
        if tensor.name in graph_outputs:
            return f"{tensor.name!r} inside the activation is a graph output"
        if not tensor.outputs:
            return f"{tensor.name!r} inside the activation leads nowhere"
        for node in tensor.outputs:
            if node.op not in PER_NEURON_OPS:
                return f"{node.op} ({node.name}) between them is not a per-neuron op"
            if id(node) not in nodes:
                nodes[id(node)] = node
                frontier += list(node.outputs)
    produced = {start.name} | {out.name for node in nodes.values() for out in node.outputs}
    for node in nodes.values():
        for tensor in node.inputs:
            bias = node.op == "BiasGelu" and isinstance(tensor, gs.Constant) and list(tensor.shape) == [width]
            if tensor.name not in produced and not _is_scalar(tensor) and not bias:
                if isinstance(tensor, gs.Constant):
                    return f"{node.op} ({node.name}) also takes a constant of more than one value"
                gated = ": a gated MLP, not cut yet" if node.op == "Mul" else ""
                return f"{node.op} ({node.name}) also takes another activation, {tensor.name!r}{gated}"
    return None if target in produced else "the down projection does not read what the activation makes"


def match_ffn_blocks(graph: gs.Graph, layers: list[LinearLayer]) -> Matches[FfnBlock]:
    """(up, down) pairs of plain MatMul layers with constant weights joined by a per-neuron activation, in model
    order (low-rank eligibility does not matter: a layer too small to split can still be narrowed). The plain
    layers that widen their input and are not taken say why."""
    tensors, graph_outputs = graph.tensors(), {t.name for t in graph.outputs}
    downs = {layer.input_name: layer for layer in layers if is_plain(layer)}
    matches: Matches[FfnBlock] = Matches()
    for up in layers:
        if not is_plain(up):
            continue
        reasons = []
        for hidden, down in downs.items():
            if down.d_in != up.d_out or down is up:
                continue
            reason = _activation_path(tensors[up.output_name], hidden, up.d_out, graph_outputs)
            if reason is None:
                matches.found.append(FfnBlock(up, down))
                break
            reasons.append(reason)
        else:
            if up.d_out > up.d_in:  # shaped like an up projection: say why it is not one
                why = "; ".join(sorted(set(reasons))) or f"no plain layer reads its {up.d_out} features"
                matches.refuse(up.name, f"not an FFN up projection: {why}")
    return matches


def find_ffn_blocks(graph: gs.Graph, layers: list[LinearLayer]) -> list[FfnBlock]:
    """The FFN blocks `match_ffn_blocks` finds."""
    return match_ffn_blocks(graph, layers).found


def prune_block(graph: gs.Graph, block: FfnBlock, cut: NeuronCut) -> PassResult:
    """Keep `cut.keep` neurons of `block` (in place): slice W_up's columns and b_up, write W′ and b′ (into the
    bias Add, or the fused BiasGelu / SkipLayerNormalization that adds the bias)."""
    tensors = graph.tensors()
    keep, dtype = cut.keep, block.up.dtype
    scope = Scope(graph, f"{block.up.name}/pruned")
    up_matmul, _ = matmul_and_add(tensors, block.up)
    up_matmul.inputs[1] = scope.constant("weight", np.asarray(block.up.weight)[:, keep].astype(dtype))
    if block.up.bias is not None:
        set_bias(graph, block.up, scope.constant("bias", np.asarray(block.up.bias)[keep].astype(dtype)))
    down_scope = Scope(graph, f"{block.down.name}/refit")
    down_matmul, _ = matmul_and_add(tensors, block.down)
    down_matmul.inputs[1] = down_scope.constant("weight", cut.weight.astype(dtype))
    set_bias(graph, block.down, down_scope.constant("bias", cut.bias.astype(dtype)))
    forget_shapes(graph, list(up_matmul.outputs), {block.down.output_name})
    return committed(graph, neurons_removed=block.width - len(keep))
