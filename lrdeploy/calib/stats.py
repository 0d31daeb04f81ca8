"""Collect first and second moments of chosen tensors with ONNX Runtime, streamed batch by batch.

For each requested tensor X (feature size d) the model is augmented with a few nodes that reduce a
batch to Σx (d), Σxxᵀ (d×d) and the position count, so full activations never leave the runtime:

    X ─Cast(f32)─Reshape[-1,d]─┬─Mul(mask)─► Xm ─┬─ReduceSum(axis 0) ─────────► Σx
                               │                 └─ MatMul(Xmᵀ, Xm) ──────────► Σxxᵀ
    attention_mask ─Cast─Reshape[-1,1]─┘ ─ReduceSum ─────────────────────────► count

Padding positions (mask 0) are left out when the model has an attention mask and X has one row per
token. The per-batch sums come back in float32 and are accumulated in float64. Tensors are processed
in groups whose Gram matrices fit `max_gram_bytes`, one forward pass over the data per group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import CalibrationDataError, InternalError
from lrdeploy.lowrank.moments import Moments
from lrdeploy.runtime.onnxruntime import create_session

DEFAULT_MAX_GRAM_BYTES = 768 << 20


@dataclass(frozen=True)
class TensorRequest:
    """A tensor to collect moments of: its name and feature size (last axis)."""

    name: str
    dim: int


def _tensor_ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Ranks of the graph's tensors from ONNX shape inference (tensors it cannot type are absent)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model) if model.ByteSize() < (1 << 31) - (1 << 20) else model
    except Exception:
        inferred = model
    ranks = {}
    for value in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        if value.type.tensor_type.HasField("shape"):
            ranks[value.name] = len(value.type.tensor_type.shape.dim)
    return ranks


def group_requests(requests: Sequence[TensorRequest], max_gram_bytes: int) -> list[list[TensorRequest]]:
    """Split requests into groups whose float32 Gram matrices together stay under `max_gram_bytes`."""
    groups: list[list[TensorRequest]] = []
    current: list[TensorRequest] = []
    used = 0
    for request in requests:
        size = 4 * request.dim * request.dim
        if current and used + size > max_gram_bytes:
            groups.append(current)
            current, used = [], 0
        current.append(request)
        used += size
    if current:
        groups.append(current)
    return groups


def _unique(requests: Sequence[TensorRequest]) -> list[TensorRequest]:
    return list({r.name: r for r in requests}.values())


def count_passes(requests: Sequence[TensorRequest], max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES) -> int:
    """How many forward passes over the data collecting `requests` takes."""
    return len(group_requests(_unique(requests), max_gram_bytes))


def _mask_column(graph: gs.Graph, tensors: dict, mask_name: str | None) -> gs.Variable | None:
    if mask_name is None:
        return None
    mask_f = graph.layer(op="Cast", inputs=[tensors[mask_name]], outputs=["lrdeploy_calib/mask_f32"],
                         attrs={"to": onnx.TensorProto.FLOAT})[0]
    return graph.layer(op="Reshape", inputs=[mask_f, np.array([-1, 1], np.int64)],
                       outputs=["lrdeploy_calib/mask_column"])[0]


def _rows(graph: gs.Graph, tensors: dict, name: str, dim: int, prefix: str, mask_column) -> gs.Variable:
    """`name` as float32 rows [positions, dim], zeroed where the mask is 0 (when `mask_column` is given)."""
    source = tensors.get(name)
    if source is None:
        raise InternalError(f"tensor {name!r} is not in the graph")
    x = graph.layer(op="Cast", inputs=[source], outputs=[f"{prefix}/f32"], attrs={"to": onnx.TensorProto.FLOAT})[0]
    rows = graph.layer(op="Reshape", inputs=[x, np.array([-1, dim], np.int64)], outputs=[f"{prefix}/rows"])[0]
    if mask_column is not None:
        rows = graph.layer(op="Mul", inputs=[rows, mask_column], outputs=[f"{prefix}/masked"])[0]
    return rows


def _count(graph: gs.Graph, rows: gs.Variable, mask_column, prefix: str) -> gs.Variable:
    if mask_column is not None:
        count = graph.layer(op="ReduceSum", inputs=[mask_column], outputs=[f"{prefix}/count"], attrs={"keepdims": 0})[0]
        count.dtype = np.float32
    else:
        count = graph.layer(op="Shape", inputs=[rows], outputs=[f"{prefix}/count"], attrs={"end": 1})[0]
        count.dtype = np.int64
    return count


def _sum_and_grams(graph: gs.Graph, rows: gs.Variable, others: list[gs.Variable], prefix: str) -> list[gs.Variable]:
    """Σrows (axis 0), then rowsᵀ·other for each of `others`."""
    total = graph.layer(op="ReduceSum", inputs=[rows, np.array([0], np.int64)], outputs=[f"{prefix}/total"],
                        attrs={"keepdims": 0})[0]
    rows_t = graph.layer(op="Transpose", inputs=[rows], outputs=[f"{prefix}/rows_t"], attrs={"perm": [1, 0]})[0]
    grams = [graph.layer(op="MatMul", inputs=[rows_t, other], outputs=[f"{prefix}/gram{i}"])[0]
             for i, other in enumerate(others)]
    for tensor in [total, *grams]:
        tensor.dtype = np.float32
    return [total, *grams]


def _augmented_model(
    graph: gs.Graph, group: Sequence[TensorRequest], mask_name: str | None, ranks: dict[str, int], mask_rank: int
) -> onnx.ModelProto:
    """A copy of the model whose only outputs are the moment sums (count, Σx, Σxxᵀ) of the group's tensors."""
    graph = graph.copy()
    tensors = graph.tensors()
    mask_column = _mask_column(graph, tensors, mask_name)
    outputs: list[gs.Variable] = []
    for index, request in enumerate(group):
        prefix = f"lrdeploy_calib/{index}"
        mask = mask_column if ranks.get(request.name) == mask_rank + 1 else None
        rows = _rows(graph, tensors, request.name, request.dim, prefix, mask)
        outputs += [_count(graph, rows, mask, prefix), *_sum_and_grams(graph, rows, [rows], prefix)]
    graph.outputs = outputs
    graph.cleanup().toposort()
    return gs.export_onnx(graph, do_type_check=False)


@dataclass(frozen=True)
class CrossRequest:
    """Collect the moments of `source` (dim) jointly with `target` (target_dim) at the same positions."""

    source: str
    dim: int
    target: str
    target_dim: int


@dataclass
class CrossMoments:
    """Over `count` positions: Σz, Σy, Σzzᵀ and Σzyᵀ (float64)."""

    count: float
    sum_source: np.ndarray
    sum_target: np.ndarray
    source_gram: np.ndarray
    cross_gram: np.ndarray


def collect_cross_moments(
    model: onnx.ModelProto, requests: Sequence[CrossRequest], batches: Iterable[dict[str, np.ndarray]],
    mask_name: str | None = None, threads: int = 0,
) -> list[CrossMoments]:
    """Joint moments of each (source, target) pair of tensors over all batches, in one forward pass each batch.

    Both tensors of a pair must have one row per position (e.g. [batch, seq, ·]); padding is masked out
    when `mask_name` is given and the tensors have one more axis than the mask.
    """
    graph = gs.import_onnx(model)
    ranks = _tensor_ranks(model)
    mask_rank = ranks.get(mask_name, 2) if mask_name else 0
    tensors = graph.tensors()
    mask_column = _mask_column(graph, tensors, mask_name)
    outputs: list[gs.Variable] = []
    for index, request in enumerate(requests):
        prefix = f"lrdeploy_cross/{index}"
        mask = mask_column if ranks.get(request.source) == mask_rank + 1 else None
        z = _rows(graph, tensors, request.source, request.dim, f"{prefix}/z", mask)
        y = _rows(graph, tensors, request.target, request.target_dim, f"{prefix}/y", mask)
        z_total, zz, zy = _sum_and_grams(graph, z, [z, y], f"{prefix}/z")
        y_total = graph.layer(op="ReduceSum", inputs=[y, np.array([0], np.int64)], outputs=[f"{prefix}/y_total"],
                              attrs={"keepdims": 0})[0]
        y_total.dtype = np.float32
        outputs += [_count(graph, z, mask, prefix), z_total, y_total, zz, zy]
    graph.outputs = outputs
    graph.cleanup().toposort()
    session = create_session(gs.export_onnx(graph, do_type_check=False), threads)
    names = [o.name for o in session.get_outputs()]
    results = [CrossMoments(0.0, np.zeros(r.dim), np.zeros(r.target_dim), np.zeros((r.dim, r.dim)),
                            np.zeros((r.dim, r.target_dim))) for r in requests]
    for feed in batches:
        values = session.run(names, feed)
        for index, result in enumerate(results):
            count, z_total, y_total, zz, zy = values[5 * index: 5 * index + 5]
            result.count += float(np.asarray(count).reshape(-1)[0])
            result.sum_source += z_total
            result.sum_target += y_total
            result.source_gram += zz
            result.cross_gram += zy
    return results


def collect_moments(
    model: onnx.ModelProto,
    requests: Sequence[TensorRequest],
    batches: Callable[[], Iterable[dict[str, np.ndarray]]],
    mask_name: str | None = None,
    max_gram_bytes: int = DEFAULT_MAX_GRAM_BYTES,
    threads: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Moments]:
    """Moments of every requested tensor over all batches (`batches()` is called once per group).

    `on_batch` is called after each batch of each group (for progress bars).
    """
    requests = _unique(requests)
    graph = gs.import_onnx(model)
    ranks = _tensor_ranks(model)
    mask_rank = ranks.get(mask_name, 2) if mask_name else 0
    moments = {r.name: Moments.zeros(r.dim) for r in requests}
    for group in group_requests(requests, max_gram_bytes):
        session = create_session(_augmented_model(graph, group, mask_name, ranks, mask_rank), threads)
        output_names = [o.name for o in session.get_outputs()]
        for feed in batches():
            try:
                values = session.run(output_names, feed)
            except Exception as exc:
                raise CalibrationDataError(
                    f"ONNX Runtime could not run the model on the calibration inputs ({str(exc).splitlines()[0]}); "
                    "check the input shapes and values (see --shape)"
                ) from None
            for index, request in enumerate(group):
                count, total, gram = values[3 * index: 3 * index + 3]
                count = float(np.asarray(count).reshape(-1)[0])
                moments[request.name] = moments[request.name].add(count, total, gram)
            if on_batch is not None:
                on_batch()
    return moments
