"""Re-tie an LM head to the embedding table it shares in PyTorch.

torch's exporter folds the head's `Transpose(embedding)` into a second initializer, so a tied model is written
with two copies of its largest matrix (SmolLM2-135M: 653 MB instead of 539 MB) and the copy looks like an
ordinary layer that compression could split:

    Gather(E[V,d])   …   MatMul(x, E_T[d,V])          ⇒   Gather(E)   …   MatMul(x, Transpose(E))

A MatMul weight equal to the transpose of a Gather's table (compared exactly) reads the table through a Transpose
again; the copy is dropped. Compression then sees one weight read by two nodes and keeps it dense, tied."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from lrdeploy.passes.contract import PassResult, committed


def retie_transposed_copies(graph: gs.Graph) -> PassResult:
    """Replace every MatMul weight that is an exact transposed copy of a Gather's table by a Transpose of it."""
    tables = [node.inputs[0] for node in graph.nodes
              if node.op == "Gather" and isinstance(node.inputs[0], gs.Constant) and len(node.inputs[0].shape) == 2]
    tied = 0
    for node in list(graph.nodes):
        if node.op != "MatMul" or not isinstance(node.inputs[1], gs.Constant) or len(node.inputs[1].shape) != 2:
            continue
        weight = node.inputs[1]
        for table in tables:
            if tuple(table.shape[::-1]) == tuple(weight.shape) and np.array_equal(table.values.T, weight.values):
                transposed = gs.Variable(f"{table.name}_transposed", dtype=weight.dtype, shape=list(weight.shape))
                graph.nodes.append(gs.Node("Transpose", f"{node.name}/tied_transpose", {"perm": [1, 0]},
                                           inputs=[table], outputs=[transposed]))
                node.inputs[1] = transposed
                tied += 1
                break
    return committed(graph, weights_retied=tied)
