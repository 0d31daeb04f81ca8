"""Collect first and second moments of chosen tensors with ONNX Runtime, streamed batch by batch.

`passes.moment_graph` turns the model into one whose outputs are each batch's sums (count, Σx, Σxxᵀ, and for
joint requests Σy, Σxyᵀ), so full activations never leave the runtime; here they are accumulated in float64.
Tensors are processed in groups whose Gram matrices fit `max_gram_bytes`, one forward pass over the data per
group.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy.errors import CalibrationDataError
from lrdeploy.lowrank.moments import JointMoments, Moments
from lrdeploy.passes.moment_graph import MomentRequest, moment_graph, tensor_ranks
from lrdeploy.runtime.onnxruntime import create_session

DEFAULT_MAX_GRAM_BYTES = 768 << 20
Batches = Callable[[], Iterable[dict[str, np.ndarray]]]


@dataclass(frozen=True)
class TensorRequest:
    """A tensor to collect moments of: its name and feature size (last axis)."""

    name: str
    dim: int


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


def count_passes(requests: Sequence[TensorRequest], max_gram_bytes: int | None = None) -> int:
    """How many forward passes over the data collecting `requests` takes."""
    return len(group_requests(_unique(requests), max_gram_bytes or DEFAULT_MAX_GRAM_BYTES))


def sums_per_batch(model: onnx.ModelProto, threads: int, batches: Iterable[dict[str, np.ndarray]],
                    on_batch: Callable[[], None] | None, external_dir: Path | None = None
                    ) -> Iterable[list[np.ndarray]]:
    """The moment graph's outputs for each batch; a batch the model cannot run on is a user error."""
    session = create_session(model, threads, external_dir=external_dir)
    names = [o.name for o in session.get_outputs()]
    for feed in batches:
        try:
            values = session.run(names, feed)
        except Exception as exc:
            raise CalibrationDataError(
                f"ONNX Runtime could not run the model on the calibration inputs ({str(exc).splitlines()[0]}); "
                "check the input shapes and values (see --shape)"
            ) from None
        yield [np.asarray(v) for v in values]
        if on_batch is not None:
            on_batch()


def batch_count(value: np.ndarray) -> float:
    return float(value.reshape(-1)[0])


def add_batch_sums(moments: dict[str, Moments], requests: Sequence[TensorRequest], values: Sequence[np.ndarray]
                   ) -> None:
    """Add one batch's sums (a moment graph's outputs: count, Σx, Σxxᵀ per request, in order) to `moments`."""
    for index, request in enumerate(requests):
        count, total, gram = values[3 * index: 3 * index + 3]
        moments[request.name] = moments[request.name].add(batch_count(count), total, gram)


def collect_moments(
    model: onnx.ModelProto,
    requests: Sequence[TensorRequest],
    batches: Batches,
    mask_name: str | None = None,
    max_gram_bytes: int | None = None,
    threads: int = 0,
    on_batch: Callable[[], None] | None = None,
) -> dict[str, Moments]:
    """Moments of every requested tensor over all batches (`batches()` is called once per group).

    `on_batch` is called after each batch of each group (for progress bars).
    """
    moments: dict[str, Moments] = {}
    for group in moments_by_group(model, requests, batches, mask_name, max_gram_bytes, threads, on_batch):
        moments.update(group.collect())
    return moments


@dataclass(frozen=True)
class RequestGroup:
    """One forward pass's worth of requests: `collect()` runs the pass and returns their moments."""

    requests: list[TensorRequest]
    collect: Callable[[], dict[str, Moments]]

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.requests]


def moments_by_group(
    model: onnx.ModelProto,
    requests: Sequence[TensorRequest],
    batches: Batches,
    mask_name: str | None = None,
    max_gram_bytes: int | None = None,
    threads: int = 0,
    on_batch: Callable[[], None] | None = None,
    external_dir: Path | None = None,
) -> Iterator[RequestGroup]:
    """The requests in groups whose Gram matrices fit `max_gram_bytes`, each collected on demand, so that a caller
    can use one group's moments and free them before the next (a build bounded by a group, not the model).
    `external_dir`: where the model's external weights are read from, when `model` holds references to them."""
    graph, ranks = gs.import_onnx(model), tensor_ranks(model)
    for group in group_requests(_unique(requests), max_gram_bytes or DEFAULT_MAX_GRAM_BYTES):
        def collect(group: list[TensorRequest] = group) -> dict[str, Moments]:
            sums_model = moment_graph(graph, ranks, [MomentRequest(r.name, r.dim) for r in group], mask_name)
            moments = {r.name: Moments.zeros(r.dim) for r in group}
            for values in sums_per_batch(sums_model, threads, batches(), on_batch, external_dir):
                add_batch_sums(moments, group, values)
            return moments

        yield RequestGroup(group, collect)


def collect_joint_moments(model: onnx.ModelProto, requests: Sequence[MomentRequest],
                          batches: Iterable[dict[str, np.ndarray]], mask_name: str | None = None,
                          threads: int = 0) -> list[JointMoments]:
    """Joint moments of each request's (source, target) pair over all batches, in one forward pass each batch.

    Both tensors of a pair must have one row per position (e.g. [batch, seq, ·]); padding is masked out when
    `mask_name` is given and the tensors have one more axis than the mask.
    """
    sums_model = moment_graph(gs.import_onnx(model), tensor_ranks(model), requests, mask_name)
    results = [JointMoments.zeros(r.dim, r.target_dim) for r in requests]
    for values in sums_per_batch(sums_model, threads, batches, None):
        results = [result.add(batch_count(count), total, gram, target_total, cross)
                   for result, (count, total, gram, target_total, cross)
                   in zip(results, (values[5 * i: 5 * i + 5] for i in range(len(requests))))]
    return results
