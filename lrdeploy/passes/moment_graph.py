"""The calibration graph: a copy of the model whose outputs are the per-batch moment sums of chosen tensors,
so that full activations never leave ONNX Runtime.

For each request (a source tensor X of feature size d, optionally with a target tensor Y of size d_y read at
the same positions):

    X ─Cast(f32)─Reshape[-1,d]───[Mul(mask)]─► Xm ─┬─ReduceSum(axis 0) ───────► Σx
                                                    ├─MatMul(Transpose(Xm), Xm) ► Σxxᵀ
                                                    └─MatMul(Transpose(Xm), Ym) ► Σxyᵀ   (with a target)
    Y ─Cast(f32)─Reshape[-1,d_y]─[Mul(mask)]─► Ym ──ReduceSum(axis 0) ───────► Σy     (with a target)
    attention_mask ─Cast(f32)─Reshape[-1,1] ─ReduceSum ───────────────────────► count (Shape(Xm)[0] without)

Outputs per request, in order: count, Σx, Σxxᵀ, then Σy, Σxyᵀ with a target. Padding positions (mask 0) are
zeroed when the model has an attention mask and X has one axis more than the mask (one row per token).
The nodes are written for the model's own opset: ReduceSum takes its axes as an attribute below opset 13,
and below opset 15 the row count is Gather(Shape(Xm), 0) instead of Shape(Xm, end=1).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import InternalError
from lrdeploy.onnx_io import PROTOBUF_LIMIT, serialized_size
from lrdeploy.passes.naming import Scope

SCOPE = "lrdeploy_calib"
FLOAT = onnx.TensorProto.FLOAT


@dataclass(frozen=True)
class MomentRequest:
    """Collect count, Σx and Σxxᵀ of `source` (feature size `dim`); with a `target` (size `target_dim`) at the
    same positions, also Σy and Σxyᵀ."""

    source: str
    dim: int
    target: str | None = None
    target_dim: int = 0

    @property
    def output_count(self) -> int:
        return 3 if self.target is None else 5


def _infer_shapes(model: onnx.ModelProto) -> onnx.ModelProto:
    """ONNX's shape inference; for graphs with ONNX Runtime's contrib ops (com.microsoft: Attention,
    SkipLayerNormalization, ...), which it cannot type, ONNX Runtime's symbolic shape inference."""
    if serialized_size(model) >= PROTOBUF_LIMIT - (1 << 20):
        return model
    if any(node.domain not in ("", "ai.onnx") for node in model.graph.node):
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        return SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    return onnx.shape_inference.infer_shapes(model)


def tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of the graph's tensors from shape inference (tensors it cannot type are absent)."""
    return inferred_types(model)[1]


def inferred_types(model: onnx.ModelProto) -> tuple[dict[str, onnx.TypeProto], dict[str, int]]:
    """The types shape inference gives the graph's tensors (those with an element type), and their ranks (those
    with a shape); tensors it cannot type are absent."""
    try:
        inferred = _infer_shapes(model)
    except Exception:  # noqa: BLE001 — without shapes, masking is skipped rather than the build failed
        inferred = model
    types, ranks = {}, {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type
        if value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return types, ranks


def _rows(scope: Scope, source: gs.Tensor, dim: int, mask_column: gs.Variable | None) -> gs.Variable:
    """`source` as float32 rows [positions, dim], zeroed where the mask is 0 (when `mask_column` is given)."""
    x = scope.op("Cast", "f32", [source], {"to": FLOAT}, dtype=np.float32)
    rows = scope.op("Reshape", "rows", [x, np.array([-1, dim], np.int64)], dtype=np.float32)
    return rows if mask_column is None else scope.op("Mul", "masked", [rows, mask_column], dtype=np.float32)


def _column_sum(scope: Scope, rows: gs.Variable) -> gs.Variable:
    if scope.graph.opset < 13:
        return scope.op("ReduceSum", "total", [rows], {"axes": [0], "keepdims": 0}, dtype=np.float32)
    return scope.op("ReduceSum", "total", [rows, np.array([0], np.int64)], {"keepdims": 0}, dtype=np.float32)


def _count(scope: Scope, rows: gs.Variable, mask_column: gs.Variable | None) -> gs.Variable:
    if mask_column is not None:
        return scope.op("ReduceSum", "count", [mask_column], {"keepdims": 0}, dtype=np.float32)
    if scope.graph.opset < 15:
        shape = scope.op("Shape", "shape", [rows], dtype=np.int64)
        return scope.op("Gather", "count", [shape, np.array(0, np.int64)], {"axis": 0}, dtype=np.int64)
    return scope.op("Shape", "count", [rows], {"end": 1}, dtype=np.int64)


def token_tensors(graph: gs.Graph, mask_name: str) -> set[str]:
    """The tensors computed from the inputs the mask describes (those whose leading axes are the mask's: the token
    ids beside `attention_mask`): only their rows are masked. A vision tower beside a text tower (CLIP) has the same
    rank per token but other samples and positions. Where no input shares the mask's axes by name (a decoder's mask
    over past and new tokens), every tensor is."""
    mask = next(t for t in graph.inputs if t.name == mask_name)
    axes = list(mask.shape or [])
    frontier = [t for t in graph.inputs if t.name != mask_name and t.shape is not None
                and len(t.shape) >= len(axes) and list(t.shape[:len(axes)]) == axes]
    if not frontier:
        return set(graph.tensors())
    reached = {t.name for t in frontier}
    while frontier:
        for node in frontier.pop().outputs:
            for tensor in node.outputs:
                if tensor.name not in reached:
                    reached.add(tensor.name)
                    frontier.append(tensor)
    return reached


def moment_graph(graph: gs.Graph, ranks: dict[str, int], requests: Sequence[MomentRequest],
                 mask_name: str | None, keep: Sequence[str] = (), masked: set[str] | None = None) -> onnx.ModelProto:
    """A copy of `graph` (left unchanged) whose only outputs are the moment sums of `requests`, in order, then the
    tensors named in `keep` (what a segment passes on to the next, `calib.segments`).

    `ranks` are the model's tensor ranks (`tensor_ranks`), to tell per-token tensors from pooled ones; `masked`, the
    tensors whose rows the mask applies to (default: `token_tensors` of this graph).
    """
    graph = graph.copy()
    tensors = graph.tensors()
    root = Scope(graph, SCOPE)
    mask_column = None
    if mask_name is not None:
        mask = root.op("Cast", "mask_f32", [tensors[mask_name]], {"to": FLOAT}, dtype=np.float32)
        mask_column = root.op("Reshape", "mask_column", [mask, np.array([-1, 1], np.int64)], dtype=np.float32)
    per_token_rank = ranks.get(mask_name, 2) + 1 if mask_name else None
    masked_tensors = masked if masked is not None else token_tensors(graph, mask_name) if mask_name else set()
    outputs: list[gs.Variable] = []
    for index, request in enumerate(requests):
        scope = root.child(str(index))
        missing = [name for name in (request.source, request.target) if name is not None and name not in tensors]
        if missing:
            raise InternalError(f"tensor {missing[0]!r} is not in the graph")
        mask = mask_column if ranks.get(request.source) == per_token_rank and request.source in masked_tensors else None
        x = _rows(scope.child("x"), tensors[request.source], request.dim, mask)
        transposed = scope.op("Transpose", "x_t", [x], {"perm": [1, 0]}, dtype=np.float32)
        outputs += [_count(scope, x, mask), _column_sum(scope.child("x"), x),
                    scope.op("MatMul", "xx", [transposed, x], dtype=np.float32)]
        if request.target is not None:
            y = _rows(scope.child("y"), tensors[request.target], request.target_dim, mask)
            outputs += [_column_sum(scope.child("y"), y), scope.op("MatMul", "xy", [transposed, y], dtype=np.float32)]
    graph.outputs = outputs + [tensors[name] for name in keep]
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False)
