"""Narrow FFN blocks: keep k of their f intermediate neurons.

    X ─MatMul(W_up[d,f])─Add(b_up)─ act ─► H[…,f] ─MatMul(W_down[f,d])─Add(b_down)─► Y
        ⇒  X ─MatMul(W_up[:,S])─Add(b_up[S])─ act ─► H_S[…,k] ─MatMul(W′[k,d])─Add(b′)─► Y

`act` is any chain of per-neuron ops (GELU as Div/Erf/Add/Mul or tanh's spelled-out form, ReLU, SiLU as
x·Sigmoid(x), …, or ONNX Runtime's BiasGelu, which then carries b_up) whose other inputs are scalars, so slicing
neurons commutes with it; Reshapes that keep the neuron axis last may sit on it (GPT-2's Conv1D leaves torch's
legacy exporter as Reshape → Gemm on [tokens, d] → Reshape to [b, t, f]: a constant f there becomes k). A gated
MLP (SwiGLU, GeGLU: Llama, Qwen, Mistral) has two projections of X whose per-neuron paths meet in a Mul; both
keep the same neurons:

    X ─gate(W_g[d,f])─ act ─┐
                            Mul ─► H[…,f] ─down─► Y      ⇒  W_g[:,S], W_up[:,S], down refit from H_S
    X ─up(W_up[d,f])────────┘

W′ and b′ come from `lowrank.neurons.cut_neurons` (the refit that reproduces Y from the kept neurons). Matching
only reads the graph; a block that does not fit says why.
"""

from __future__ import annotations

from dataclasses import dataclass
import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.lowrank.neurons import NeuronCut
from lrdeploy.passes.contract import Matches, PassResult, committed
from lrdeploy.passes.linear_layers import LinearLayer, constant_value
from lrdeploy.passes.layer_nodes import (forget_shapes, is_sliceable, matmul_and_add, reshape_target_dims,
                                         resize_shape_axis, set_bias, set_weight)
from lrdeploy.passes.naming import Scope

PER_NEURON_OPS = {"Add", "Sub", "Mul", "Div", "Erf", "Tanh", "Sigmoid", "Relu", "Gelu", "FastGelu", "BiasGelu",
                  "Pow", "Sqrt", "Identity", "Cast", "LeakyRelu", "Elu", "Softplus"}


@dataclass
class FfnBlock:
    """An up projection, the per-neuron activation after it, and the down projection reading its output; in a
    gated MLP also the gate projection, whose activation multiplies the up projection's output."""

    up: LinearLayer
    down: LinearLayer
    gate: LinearLayer | None = None

    @property
    def width(self) -> int:
        return self.up.d_out

    @property
    def widening(self) -> list[LinearLayer]:
        """The projections whose output columns are the neurons (gate and up)."""
        return [self.gate, self.up] if self.gate is not None else [self.up]

    @property
    def layers(self) -> list[LinearLayer]:
        return [*self.widening, self.down]

    @property
    def params_per_neuron(self) -> int:
        """Weights one neuron holds: a column of each widening projection and a row of the down projection."""
        return sum(layer.d_in for layer in self.widening) + self.down.d_out


def _is_scalar(tensor: gs.Tensor) -> bool:
    """A one-element constant: an initializer, or a Constant node's output (what torch's exporter writes)."""
    found = constant_value(tensor)
    return found is not None and found[0].size == 1


NEURON_LAYOUT_OPS = {"Reshape"}  # allowed on the path when the neuron axis stays last (`_keeps_neuron_axis`)
SHAPE_READERS = {"Shape"}  # read only the path's shape (a later Reshape's target follows the cut width)


def _keeps_neuron_axis(node: gs.Node, width: int) -> bool:
    """A Reshape to rank ≥ 2 whose last target entry is the neuron count or computed (-1, or from a Shape)."""
    dims = reshape_target_dims(node)
    return dims is not None and len(dims) >= 2 and dims[-1] in (width, -1, None)


def _activation_path(starts: list[gs.Tensor], target: str, width: int, graph_outputs: set[str]) -> str | None:
    """Why the way from the `starts` (one projection's output, or a gated MLP's gate and up outputs) to the tensor
    named `target` is not a per-neuron activation (None when it is: per-neuron ops whose other inputs are
    scalars, BiasGelu's [width] bias or another start, and Reshapes that keep the neuron axis last, with no
    other way out than Shape reads)."""
    nodes: dict[int, gs.Node] = {}
    frontier = list(starts)
    while frontier:
        tensor = frontier.pop()
        if tensor.name == target:
            continue
        if tensor.name in graph_outputs:
            return f"{tensor.name!r} inside the activation is a graph output"
        if not tensor.outputs:
            return f"{tensor.name!r} inside the activation leads nowhere"
        for node in tensor.outputs:
            if node.op in SHAPE_READERS:
                continue
            if node.op in NEURON_LAYOUT_OPS and node.inputs[0] is tensor:
                if not _keeps_neuron_axis(node, width):
                    return f"{node.op} ({node.name}) between them moves the neuron axis"
            elif node.op not in PER_NEURON_OPS:
                return f"{node.op} ({node.name}) between them is not a per-neuron op"
            if id(node) not in nodes:
                nodes[id(node)] = node
                frontier += list(node.outputs)
    produced = {start.name for start in starts} | {out.name for node in nodes.values() for out in node.outputs}
    for node in nodes.values():
        for tensor in node.inputs[:1] if node.op in NEURON_LAYOUT_OPS else node.inputs:
            bias = node.op == "BiasGelu" and isinstance(tensor, gs.Constant) and list(tensor.shape) == [width]
            if tensor.name not in produced and not _is_scalar(tensor) and not bias:
                if isinstance(tensor, gs.Constant):
                    return f"{node.op} ({node.name}) also takes a constant of more than one value"
                return f"{node.op} ({node.name}) also takes another activation, {tensor.name!r}"
    return None if target in produced else "the down projection does not read what the activation makes"


def _gate_partner(up: LinearLayer, plain: list[LinearLayer]) -> LinearLayer | None:
    """The other projection of a gated MLP: a plain layer reading the same input at the same width."""
    return next((other for other in plain if other is not up and other.input_name == up.input_name
                 and other.d_out == up.d_out and other.d_in == up.d_in), None)


def _gate_first(tensors: dict[str, gs.Tensor], first: LinearLayer, second: LinearLayer) -> tuple[LinearLayer, LinearLayer]:
    """(gate, up): the gate is the projection whose output goes through a nonlinearity before the Mul that joins
    them; the up projection's output feeds that Mul directly."""
    direct = {node.op for node in tensors[second.output_name].outputs}
    return (first, second) if direct == {"Mul"} else (second, first)


def match_ffn_blocks(graph: gs.Graph, layers: list[LinearLayer]) -> Matches[FfnBlock]:
    """(up, down) pairs of plain MatMul layers with constant weights joined by a per-neuron activation, or gated
    MLPs (gate, up, down), in model order (low-rank eligibility does not matter: a layer too small to split can
    still be narrowed). The plain layers that widen their input and are not taken say why."""
    tensors, graph_outputs = graph.tensors(), {t.name for t in graph.outputs}
    plain = [layer for layer in layers if is_sliceable(layer)]
    downs = {layer.input_name: layer for layer in plain}
    matches: Matches[FfnBlock] = Matches()
    taken: set[str] = set()
    for up in plain:
        if up.name in taken:
            continue
        reasons = []
        partner = _gate_partner(up, plain)
        for hidden, down in downs.items():
            if down.d_in != up.d_out or down is up:
                continue
            reason = _activation_path([tensors[up.output_name]], hidden, up.d_out, graph_outputs)
            if reason is None:
                matches.found.append(FfnBlock(up, down))
                break
            if partner is not None and _activation_path([tensors[up.output_name], tensors[partner.output_name]],
                                                         hidden, up.d_out, graph_outputs) is None:
                gate, gated_up = _gate_first(tensors, up, partner)
                matches.found.append(FfnBlock(gated_up, down, gate))
                taken.add(partner.name)
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
    """Keep `cut.keep` neurons of `block` (in place): slice the columns and biases of the up projection (and of the
    gate), write W′ and b′ (into the bias Add, a Gemm's C, or the fused BiasGelu / SkipLayerNormalization that adds
    the bias), and say k where a Reshape on the activation's way names the neuron count."""
    tensors = graph.tensors()
    keep, dtype = cut.keep, block.up.dtype
    widened = []
    for layer in block.widening:
        scope = Scope(graph, f"{layer.name}/pruned")
        matmul, _ = matmul_and_add(tensors, layer)
        set_weight(matmul, scope.constant("weight", np.asarray(layer.weight)[:, keep].astype(dtype)))
        if layer.bias is not None:
            set_bias(graph, layer, scope.constant("bias", np.asarray(layer.bias)[keep].astype(dtype)))
        widened += list(matmul.outputs)
    down_scope = Scope(graph, f"{block.down.name}/refit")
    down_matmul, _ = matmul_and_add(tensors, block.down)
    set_weight(down_matmul, down_scope.constant("weight", cut.weight.astype(dtype)))
    set_bias(graph, block.down, down_scope.constant("bias", cut.bias.astype(dtype)))
    _resize_neuron_reshapes(Scope(graph, f"{block.up.name}/pruned"), widened, block.down.input_name, block.width,
                            len(keep))
    forget_shapes(graph, widened, {block.down.output_name})
    return committed(graph, neurons_removed=block.width - len(keep))


def _resize_neuron_reshapes(scope: Scope, starts: list[gs.Tensor], until: str, width: int, kept: int) -> None:
    """Each Reshape on the way from `starts` to the tensor `until` whose target names `width` neurons last now
    names `kept` (its own copy of the shape: other layers may share the constant)."""
    frontier, seen = list(starts), set()
    while frontier:
        tensor = frontier.pop()
        if tensor.name == until:
            continue
        for node in tensor.outputs:
            if node.name in seen or node.op in SHAPE_READERS:
                continue
            seen.add(node.name)
            if node.op in NEURON_LAYOUT_OPS:
                resize_shape_axis(scope, f"reshape{len(seen)}", node, width, kept, -1)
            frontier += list(node.outputs)
