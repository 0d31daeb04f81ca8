"""Find the graph inputs that index a constant table, and the table's size (reads the graph only):

    input_ids ─[Cast]─► Gather(data = E[rows, d], indices) ─► ...      ⇒   {"input_ids": rows}

Token ids outside [0, rows) make ONNX Runtime fail in the middle of a run; knowing `rows` lets bad data be
refused before any work.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs


def index_limits(graph: gs.Graph) -> dict[str, int]:
    """{graph input: rows of the smallest constant table it indexes along axis 0}."""
    limits: dict[str, int] = {}
    for tensor in graph.inputs:
        readers = list(tensor.outputs)
        readers += [c for r in readers if r.op == "Cast" for c in r.outputs[0].outputs]
        for node in readers:
            if node.op != "Gather" or node.attrs.get("axis", 0) != 0 or len(node.inputs) < 2:
                continue
            data, indices = node.inputs[0], node.inputs[1]
            reaches = indices is tensor or (indices.inputs and indices.inputs[0].op == "Cast"
                                            and indices.inputs[0].inputs[0] is tensor)
            if reaches and isinstance(data, gs.Constant) and data.shape:
                limits[tensor.name] = min(limits.get(tensor.name, data.shape[0]), int(data.shape[0]))
    return limits
