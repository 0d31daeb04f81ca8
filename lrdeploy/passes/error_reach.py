"""The part of a model that a group of layers reaches: where the sensitivity graph's errors act
(`passes.inject_error`), so the only part a measurement needs to run.

    graph inputs ─► [dense model: once per probe batch] ─► crossing tensors ─┐
                                                                             ▼
    error inputs ───────────────────────────► [suffix: the layers' producers and every node they reach] ─► outputs

The suffix is a model of its own (`passes.subgraph`): the nodes the layers' outputs reach, and the nodes that make
the constant-only tensors those read (a tied LM head's transposed embedding: copied, not passed per batch). It
reads as inputs the tensors the dense model made before it — the residual stream, the mask's derived forms,
rotary tables, each layer's input — which one dense pass gives for every group. An error
in block b of n then costs about (n − b)/n of the model per measurement instead of all of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection

import onnx

from lrdeploy.passes.subgraph import has_subgraphs, static_closure, static_producers, subgraph_model
from lrdeploy.passes.linear_layers import LinearLayer


@dataclass(frozen=True)
class SuffixPlan:
    """Which nodes of the model a group of layers reaches, and the tensor names around them."""

    nodes: tuple[int, ...]  # indices into graph.node, in order
    inputs: tuple[str, ...]  # graph inputs the suffix reads, then the crossing tensors
    crossing: tuple[str, ...]  # tensors the dense model makes before the suffix
    outputs: tuple[str, ...]  # the graph outputs the suffix makes, in the graph's order

    def model(self, model: onnx.ModelProto, types: dict[str, onnx.TypeProto]) -> onnx.ModelProto:
        """The suffix as a model of its own (initializers as `model` holds them: external references stay)."""
        return subgraph_model(model, self.nodes, self.inputs, self.outputs, types)


def plan_suffix(model: onnx.ModelProto, layers: list[LinearLayer], types: dict[str, onnx.TypeProto],
                horizon: str | None = None, unscored: Collection[str] = ()) -> SuffixPlan | None:
    """The suffix of `model` (topologically sorted) from `layers`, or None when the graph cannot be cut there
    (subgraphs, whose bodies may read any outer tensor; a layer output no node makes; a tensor without a type in
    `types`, the dense model's from `inferred_types`). `horizon`: a tensor every way from the layers to the graph's
    outputs passes through (a block's residual stream at its end); the suffix then stops there, with it as its one
    output (None where some way goes around it, other than to the graph outputs `unscored`: a KV cache's)."""
    if has_subgraphs(model):
        return None
    graph = model.graph
    initializers = {tensor.name for tensor in graph.initializer}
    producer = {name: index for index, node in enumerate(graph.node) for name in node.output if name}
    if any(layer.output_name not in producer for layer in layers):
        return None
    seeds = {producer[layer.output_name] for layer in layers}
    reached_nodes: list[int] = []
    reached: set[str] = set()
    for index, node in enumerate(graph.node):
        if index in seeds or any(name in reached for name in node.input):
            reached_nodes.append(index)
            reached.update(name for name in node.output if name)
    if horizon is not None:
        reached_nodes = _up_to(graph, reached_nodes, seeds, horizon, set(unscored))
        if reached_nodes is None:
            return None
    nodes = sorted(set(reached_nodes) | static_closure(graph, reached_nodes, static_producers(graph, initializers)))
    made = {name for index in nodes for name in graph.node[index].output if name}
    reads = list(dict.fromkeys([*(name for index in nodes for name in graph.node[index].input
                                  if name and name not in initializers and name not in made),
                                *(layer.input_name for layer in layers if layer.input_name not in made)]))
    # (a layer's input is read by its error's MatMul even where its own MatMul comes before the suffix: a layer
    # with a bias, whose output is its Add's)
    graph_inputs = {value.name for value in graph.input}
    crossing = [name for name in reads if name not in graph_inputs]
    inputs = [name for name in reads if name in graph_inputs] + crossing
    outputs = [horizon] if horizon is not None else [value.name for value in graph.output if value.name in reached]
    if any(name not in types for name in inputs + outputs):
        return None
    return SuffixPlan(tuple(nodes), tuple(inputs), tuple(crossing), tuple(outputs))


def _up_to(graph: onnx.GraphProto, reached_nodes: list[int], seeds: set[int], horizon: str,
           unscored: set[str]) -> list[int] | None:
    """Those of `reached_nodes` that make `horizon` or what it is made from; None when a seed (a layer's node) is
    not among them, or a tensor they make other than `horizon` is read outside them or is a graph output not in
    `unscored` (the errors would reach the outputs around the horizon)."""
    producer = {name: index for index in reached_nodes for name in graph.node[index].output if name}
    before, wanted = set(), [horizon]
    while wanted:
        index = producer.get(wanted.pop())
        if index is not None and index not in before:
            before.add(index)
            wanted += list(graph.node[index].input)
    if not seeds <= before:
        return None
    made = {name for index in before for name in graph.node[index].output if name} - {horizon}
    if made & ({value.name for value in graph.output} - unscored) or any(
            name in made for index, node in enumerate(graph.node) if index not in before for name in node.input):
        return None
    return [index for index in reached_nodes if index in before]
