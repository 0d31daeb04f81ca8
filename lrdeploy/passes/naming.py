"""The one way passes add nodes, constants and inputs to a graph, so every new name follows one scheme.

A `Scope` is a name prefix on a graph; what it adds is named after it (person-readable in Netron and in
TensorRT layer logs, and never clashing with the model's own names when the scope is unique):

    node      <scope>/<name>            e.g. layer0/ffn/MatMul/lowrank_a
    its output <scope>/<name>/output     e.g. layer0/ffn/MatMul/lowrank_a/output
    constant  <scope>/<name>            e.g. layer0/ffn/MatMul/lowrank_a/weight
    input     <scope>/<name>            e.g. lrdeploy_sens/3/weight_error

Built on onnx-graphsurgeon's `Graph.layer`, which wires a node and its tensors in one call.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_graphsurgeon as gs


class Scope:
    """Adds named nodes, constants and graph inputs under `prefix` to `graph`."""

    def __init__(self, graph: gs.Graph, prefix: str):
        self.graph, self.prefix = graph, prefix.rstrip("/")

    def name(self, name: str) -> str:
        return f"{self.prefix}/{name}"

    def child(self, name: str) -> "Scope":
        return Scope(self.graph, self.name(name))

    def constant(self, name: str, values: np.ndarray) -> gs.Constant:
        return gs.Constant(self.name(name), np.ascontiguousarray(values))

    def variable(self, name: str, dtype: np.dtype | type | None = None) -> gs.Variable:
        """A new tensor for a node to produce (e.g. to take over an existing node's output)."""
        return gs.Variable(self.name(name), dtype=dtype)

    def add_input(self, name: str, dtype: np.dtype, shape: Sequence[int | str]) -> gs.Variable:
        """A new graph input (fed at run time)."""
        tensor = self.variable(name, dtype)
        tensor.shape = list(shape)
        self.graph.inputs.append(tensor)
        return tensor

    def op(self, op: str, name: str, inputs: Sequence[gs.Tensor | np.ndarray], attrs: dict | None = None,
           dtype: np.dtype | type | None = None, output: gs.Variable | None = None) -> gs.Variable:
        """Append node `<scope>/<name>` and return its output: a new tensor `<scope>/<name>/output` (of `dtype`
        when given; ONNX Runtime infers the rest), or `output`, an existing tensor it now produces. Array inputs
        become constants `<scope>/<name>/input<i>`."""
        target = output if output is not None else self.child(name).variable("output", dtype)
        self.op_into(op, name, inputs, [target], attrs)
        return target

    def op_into(self, op: str, name: str, inputs: Sequence[gs.Tensor | np.ndarray], outputs: Sequence[gs.Variable],
                attrs: dict | None = None) -> None:
        """Append node `<scope>/<name>` producing the existing tensors `outputs` (several, e.g. for a Split)."""
        node = self.child(name)
        wired = [node.constant(f"input{i}", t) if isinstance(t, np.ndarray) else t for i, t in enumerate(inputs)]
        self.graph.layer(op=op, name=node.prefix, inputs=wired, outputs=list(outputs), attrs=attrs or {})
