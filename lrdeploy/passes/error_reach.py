"""The sensitivity graph cut where its injected errors start to act (`passes.inject_error`): the nodes no error
input reaches give the same values for every variant, so they run once per batch; only the nodes the errors
reach run per variant.

    graph inputs ─► [before: every node no error reaches] ─► crossing tensors ─┐            (once per batch)
                                                         └─► outputs no error reaches ──────────────────────┐
    error inputs ─────────────────────────────────────► [after: the nodes they reach] ─► outputs (per variant)

An error in block b of n then costs about (n − b)/n of the model per measurement instead of all of it. Tensors
computed from constants alone (a tied LM head's transposed embedding) are not passed across: the nodes that make
them are copied into the part after the cut, as calibration's segments do.
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx

from lrdeploy.calib.segments import Segment, static_closure, static_producers, segment_model, segmentable


@dataclass
class ErrorCut:
    """The two models of a cut sensitivity graph and the tensor names that join them."""

    before: onnx.ModelProto | None  # None: every node is reached (nothing to run once)
    after: onnx.ModelProto
    before_inputs: list[str]  # graph inputs `before` reads
    crossing: list[str]  # tensors `before` makes that `after` reads
    unreached_outputs: list[str]  # graph outputs `before` makes (no error reaches them)
    after_inputs: list[str]  # what `after` reads: graph inputs (error inputs among them) and the crossing tensors


def cut_at_errors(model: onnx.ModelProto, error_inputs: set[str], known_types: dict[str, onnx.TypeProto]
                  ) -> ErrorCut | None:
    """`model` (topologically sorted) cut into what the `error_inputs` reach and the rest, or None when it cannot
    be cut (subgraphs, whose bodies may read any outer tensor; tensors without a type). Types are those the graph
    declares, else `known_types` (the dense model's, from `inferred_types`: inferring them again on every injected
    copy of an LM cost 8 s each)."""
    if not segmentable(model):
        return None
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    reached, reached_nodes = set(error_inputs), []
    for index, node in enumerate(graph.node):
        if any(name in reached for name in node.input):
            reached_nodes.append(index)
            reached.update(name for name in node.output if name)
    static = static_producers(graph, initializers)
    after_nodes = sorted(set(reached_nodes) | static_closure(graph, reached_nodes, static))
    before_nodes = sorted(set(range(len(graph.node))) - set(reached_nodes))
    made_before = {name for index in before_nodes for name in graph.node[index].output if name}
    graph_inputs = [value.name for value in graph.input]
    outputs = [value.name for value in graph.output]
    if any(name not in reached and name not in made_before for name in outputs):
        return None  # an output that is a graph input or an initializer: not worth a special case
    after_reads = _reads(graph, after_nodes, initializers)
    crossing = [name for name in after_reads if name in made_before and name not in static]
    unreached = [name for name in outputs if name not in reached]
    after_inputs = [name for name in after_reads if name in graph_inputs] + crossing
    before_inputs = [name for name in _reads(graph, before_nodes, initializers) if name in graph_inputs]
    types = {**known_types, **declared_types(model)}
    if any(name not in types for name in crossing + unreached + after_inputs + before_inputs):
        return None
    after = segment_model(model, Segment(after_nodes, after_inputs, [n for n in outputs if n in reached]), types)
    before = (segment_model(model, Segment(before_nodes, before_inputs, crossing + unreached), types)
              if crossing or unreached else None)
    return ErrorCut(before, after, before_inputs, crossing, unreached, after_inputs)


def _reads(graph: onnx.GraphProto, nodes: list[int], initializers: set[str]) -> list[str]:
    """The non-initializer tensors `nodes` read that none of them makes, in order of first reading."""
    made = {name for index in nodes for name in graph.node[index].output}
    reads: dict[str, None] = {}
    for index in nodes:
        for name in graph.node[index].input:
            if name and name not in initializers and name not in made:
                reads[name] = None
    return list(reads)


def declared_types(model: onnx.ModelProto) -> dict[str, onnx.TypeProto]:
    """The types the graph itself declares (inputs, outputs, value infos) that carry an element type."""
    graph = model.graph
    return {value.name: value.type for value in (*graph.input, *graph.output, *graph.value_info)
            if value.type.tensor_type.elem_type}
