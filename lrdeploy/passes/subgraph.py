"""Part of a graph as a model of its own: chosen nodes (a calibration segment, the part of a model a sensitivity
measurement runs), the initializers they read, and the tensors around them as typed inputs and outputs.

    graph ─► nodes [i, j, …] ─► model(inputs: what they read from before, outputs: what is read after)

A tensor computed from constants alone (torch's exporter puts every Constant node first; a tied LM head's
transposed embedding, 576 × 49152) is not an input of the part: the nodes that make it are copied into it
(`static_closure`), so it is never passed per batch.
"""

from __future__ import annotations

from typing import Sequence

import onnx


def static_producers(graph: onnx.GraphProto, initializers: set[str]) -> dict[str, int]:
    """The tensors computed from initializers and Constant nodes only, each with the index of the node that makes
    it."""
    static: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        if all(not name or name in initializers or name in static for name in node.input):
            static.update((name, index) for name in node.output if name)
    return static


def static_closure(graph: onnx.GraphProto, nodes: list[int], static: dict[str, int]) -> set[int]:
    """The nodes that make the constant-only tensors `nodes` read, and theirs in turn."""
    wanted, found = [name for index in nodes for name in graph.node[index].input if name in static], set()
    while wanted:
        index = static[wanted.pop()]
        if index not in found:
            found.add(index)
            wanted += [name for name in graph.node[index].input if name in static]
    return found


def has_subgraphs(model: onnx.ModelProto) -> bool:
    """A node carries a subgraph (If, Loop: its body may read any tensor of the graph around it, so the graph
    cannot be cut into parts)."""
    return any(attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
               for node in model.graph.node for attr in node.attribute)


def subgraph_model(model: onnx.ModelProto, nodes: Sequence[int], inputs: Sequence[str], outputs: Sequence[str],
                   types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
    """The nodes at `nodes` (indices into graph.node, in order) as a model of its own: the initializers they read
    (external references stay references), `inputs` and `outputs` typed by `types`."""
    graph = model.graph
    chosen = [graph.node[index] for index in nodes]
    read = {name for node in chosen for name in node.input}
    initializers = [tensor for tensor in graph.initializer if tensor.name in read]

    def value(name: str) -> onnx.ValueInfoProto:
        info = onnx.ValueInfoProto(name=name)
        info.type.CopyFrom(types[name])
        return info

    sub = onnx.helper.make_graph(chosen, f"{graph.name}_part", [value(n) for n in inputs],
                                 [value(n) for n in outputs], initializers)
    return onnx.helper.make_model(sub, opset_imports=model.opset_import, ir_version=model.ir_version)
