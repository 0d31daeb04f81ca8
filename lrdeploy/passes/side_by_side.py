"""The refit graph: the original and the compressed model side by side in one graph, on the same inputs.

    inputs ─┬─ original model ─────────────────► outputs
            └─ compressed model (names prefixed) ► lrdeploy_compressed/outputs

One forward pass then gives, at the same positions, a tensor of the compressed model (what a layer sees
there) and one of the original (what it should reproduce), which is what an error-aware refit regresses.
"""

from __future__ import annotations

from typing import Collection

import onnx
import onnx_graphsurgeon as gs

PREFIX = "lrdeploy_compressed/"


def compressed_name(name: str, graph_inputs: Collection[str]) -> str:
    """The name a tensor of the compressed model has in the side-by-side graph (graph inputs are shared)."""
    return name if name in graph_inputs else PREFIX + name


def side_by_side(original: onnx.ModelProto, compressed: onnx.ModelProto) -> onnx.ModelProto:
    """One graph running both models on the same inputs; the compressed copy's names start with PREFIX.

    The compressed model is copied first: onnx-graphsurgeon's constants can share TensorProtos with the
    model they came from, so renaming them in place would rename the caller's (and the original's) weights.
    """
    clone = onnx.ModelProto()
    clone.CopyFrom(compressed)
    graph, other = gs.import_onnx(original), gs.import_onnx(clone)
    inputs = {t.name: t for t in graph.inputs}
    for tensor in other.tensors().values():
        tensor.name = compressed_name(tensor.name, inputs.keys())
    for node in other.nodes:
        node.name = PREFIX + node.name if node.name else ""  # unnamed nodes stay unnamed (names must be unique)
        for index, tensor in enumerate(node.inputs):
            if tensor.name in inputs:
                node.inputs[index] = inputs[tensor.name]
        graph.nodes.append(node)
    graph.outputs = graph.outputs + [t for t in other.outputs]
    graph.toposort()
    return gs.export_onnx(graph, do_type_check=False)
