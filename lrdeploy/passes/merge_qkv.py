"""Merge each self-attention's Q, K and V projections into one layer (`--qkv joint`).

    X ─┬─ MatMul(W_q)─Add(b_q) ─► Q
       ├─ MatMul(W_k)─Add(b_k) ─► K      ⇒   X ─MatMul([W_q|W_k|W_v])─Add([b_q|b_k|b_v])─Split─► Q, K, V
       └─ MatMul(W_v)─Add(b_v) ─► V

The merge itself is exact (the same products in one GEMM). What it changes is the split that follows: the
merged layer is an ordinary linear layer to every later stage, so its low-rank form has ONE basis for the three
projections, from the covariance of their concatenated outputs:

    X ─MatMul(A[d,k])─MatMul(B[k,3d])─Add(c)─Split─► Q, K, V       (two GEMMs where separate splits make six)

which is also the shape of ONNX Runtime's fused Attention and its packed QKV weight (`--optimize ort`). Matched
like heads (`prune_heads.find_attention_blocks`); Q, K, V keep their tensor names, so nothing downstream changes.
"""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.passes.contract import PassResult, committed
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.naming import Scope
from lrdeploy.passes.prune_heads import find_qkv_triples


def find_qkv_groups(layers: list[LinearLayer]) -> list[tuple[LinearLayer, LinearLayer, LinearLayer]]:
    """(Q, K, V) of every self-attention: three plain layers reading one tensor, followed by an output projection."""
    return [tuple(projections) for projections, _ in find_qkv_triples(layers)]


def merged_name(group: tuple[LinearLayer, ...]) -> str:
    """`<common prefix>/qkv` of the three layers' names (`…/attention/self/qkv`), or `<query>/qkv` when the names
    share no path (torch's dynamo exporter: `node_MatMul_95`)."""
    prefix = os.path.commonprefix([layer.name for layer in group]).rpartition("/")[0]
    return f"{prefix}/qkv" if prefix else f"{group[0].name}/qkv"


def merge_qkv(graph: gs.Graph, group: tuple[LinearLayer, LinearLayer, LinearLayer]) -> PassResult:
    """Replace the three layers of `group` by one MatMul, one bias Add (when any had a bias) and a Split along
    the last axis into their original output tensors (in place; cleanup removes the old nodes)."""
    tensors = graph.tensors()
    dtype = group[0].dtype
    scope = Scope(graph, merged_name(group))
    widths = [layer.d_out for layer in group]
    weight = np.concatenate([np.asarray(layer.weight) for layer in group], axis=1).astype(dtype)
    merged = scope.op("MatMul", "MatMul", [tensors[group[0].input_name], scope.constant("weight", weight)],
                      dtype=dtype)
    if any(layer.bias is not None for layer in group):
        bias = np.concatenate([np.zeros(layer.d_out) if layer.bias is None else np.asarray(layer.bias)
                               for layer in group]).astype(dtype)
        merged = scope.op("Add", "Add", [merged, scope.constant("bias", bias)], dtype=dtype)
    outputs = [tensors[layer.output_name] for layer in group]
    for output in outputs:
        output.inputs.clear()  # the old MatMul (and Add) now feed nothing
    if graph.opset >= 13:
        split = scope.constant("split", np.array(widths, dtype=np.int64))
        scope.op_into("Split", "Split", [merged, split], outputs, {"axis": -1})
    else:
        scope.op_into("Split", "Split", [merged], outputs, {"axis": -1, "split": widths})
    return committed(graph, layers_merged=len(group))


def merged_qkv_model(graph: gs.Graph, layers: list[LinearLayer]) -> onnx.ModelProto:
    """A new model: `graph` (not changed) with every self-attention's Q, K and V merged."""
    merged = graph.copy()
    for group in find_qkv_groups(layers):
        merge_qkv(merged, group)
    return gs.export_onnx(merged)
