"""Tiny one-layer graphs for timing a layer shape dense against split (random weights: timing does not
depend on their values):

    dense:  x[tokens, d_in] ─MatMul(W[d_in,d_out])─Add(b)─► y
    split:  x[tokens, d_in] ─MatMul(A[d_in,k])─MatMul(B[k,d_out])─Add(b)─► y

float32, opset 17, IR version 8 (newer onnx defaults to an IR version ONNX Runtime may not read yet).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.passes.naming import Scope

OPSET = 17
IR_VERSION = 8
SCOPE = "layer"
INPUT = f"{SCOPE}/x"


def layer_model(d_in: int, d_out: int, rank: int | None, seed: int = 0) -> onnx.ModelProto:
    """The dense layer when `rank` is None, else its rank-`rank` split."""
    rng = np.random.default_rng(seed)
    graph = gs.Graph(opset=OPSET, name="layer")
    scope = Scope(graph, SCOPE)

    def weight(name: str, rows: int, columns: int | None = None) -> gs.Constant:
        shape = (rows,) if columns is None else (rows, columns)
        return scope.constant(name, (rng.standard_normal(shape) / np.sqrt(rows)).astype(np.float32))

    x = scope.add_input(INPUT.removeprefix(f"{SCOPE}/"), np.float32, ["tokens", d_in])
    if rank is None:
        product = scope.op("MatMul", "dense", [x, weight("W", d_in, d_out)], dtype=np.float32)
    else:
        middle = scope.op("MatMul", "lowrank_a", [x, weight("A", d_in, rank)], dtype=np.float32)
        product = scope.op("MatMul", "lowrank_b", [middle, weight("B", rank, d_out)], dtype=np.float32)
    y = scope.op("Add", "bias", [product, weight("b", d_out)], dtype=np.float32)
    y.shape = ["tokens", d_out]
    graph.outputs = [y]
    model = gs.export_onnx(graph)
    model.ir_version = IR_VERSION
    return model
