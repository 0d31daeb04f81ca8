"""Calibration segment by segment: the model cut into consecutive runs of nodes, each run as its own ONNX Runtime
session, so that one forward pass collects every statistic and no session holds more than one segment's weights.

    graph inputs ─► [segment 0: nodes, its weights] ─► live tensors ─► [segment 1] ─► … ─► [segment n]
                        └─► Σx, Σxxᵀ of the tensors it produces          └─► …

A segment ends where its weights or its requests' Gram matrices would pass their limits. The tensors later
segments read (the residual stream, an attention mask's derived forms, rotary tables) are kept between segments,
per batch, and dropped after their last reader. Requests are collected in the segment that produces their
tensor; the mask's token tensors are chosen on the whole graph (`moment_graph.token_tensors`), as without
segments, so the statistics are the same.

Graphs with subgraphs (If, Loop: their bodies may read any outer tensor) are calibrated as one segment.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Sequence

import onnx
import onnx_graphsurgeon as gs

from lrdeploy.calib.stats import Batches, RequestGroup, TensorRequest, add_batch_sums, sums_per_batch
from lrdeploy.lowrank.moments import Moments
from lrdeploy.passes.moment_graph import MomentRequest, inferred_types, moment_graph, token_tensors
from lrdeploy.passes.subgraph import has_subgraphs, static_closure, static_producers, subgraph_model
from lrdeploy.weights import tensor_bytes

SEGMENT_WEIGHT_BYTES = 128 << 20  # one segment's initializers; a single bigger node is a segment of its own
SEGMENT_GRAM_BYTES = 32 << 20  # its requests' float32 Gram matrices (float64 sums: twice that); a segment costs no
# extra pass, so segments are kept small: what a build holds at once is one segment's statistics


@dataclass
class Segment:
    """Consecutive nodes of the graph (indices into graph.node), what they read from before, what later segments
    (or the graph's outputs) read of theirs, and the requests collected here."""

    nodes: list[int] = field(default_factory=list)
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)
    requests: list[TensorRequest] = field(default_factory=list)


def plan_segments(model: onnx.ModelProto, requests: Sequence[TensorRequest], max_gram_bytes: int,
                  max_weight_bytes: int = SEGMENT_WEIGHT_BYTES) -> list[Segment]:
    """The model's nodes cut into segments within the limits; requests placed where their tensor is made."""
    graph = model.graph
    weights = {tensor.name: tensor_bytes(tensor) for tensor in graph.initializer}
    by_tensor: dict[str, list[TensorRequest]] = {}
    for request in requests:
        by_tensor.setdefault(request.name, []).append(request)
    segments, current, used, held = [], Segment(), set(), 0
    current.requests += [r for i in graph.input for r in by_tensor.get(i.name, [])]
    grams = sum(4 * r.dim * r.dim for r in current.requests)
    for index, node in enumerate(graph.node):
        node_weights = {name for name in node.input if name in weights}
        node_requests = [r for name in node.output for r in by_tensor.get(name, [])]
        extra_gram = sum(4 * r.dim * r.dim for r in node_requests)
        if current.nodes and (held + sum(weights[n] for n in node_weights - used) > max_weight_bytes
                              or grams + extra_gram > max_gram_bytes):
            segments.append(current)
            current, used, held, grams = Segment(), set(), 0, 0
        current.nodes.append(index)
        current.requests += node_requests
        held += sum(weights[n] for n in node_weights - used)
        used |= node_weights
        grams += extra_gram
    segments.append(current)
    _link(graph, segments, set(weights))
    return [segment for segment in segments if segment.requests or segment.outputs]  # the rest make nothing used


def _link(graph: onnx.GraphProto, segments: list[Segment], initializers: set[str]) -> None:
    """Each segment's inputs (tensors made before it, graph inputs included) and outputs (read by a later
    segment). A tensor computed from constants alone (torch's exporter puts every Constant node first; a tied LM
    head's transposed embedding, 576 × 49152) is not passed along per batch: each segment that reads it computes
    it from its own copy of the nodes that make it."""
    static = static_producers(graph, initializers)
    for segment in segments:
        segment.nodes = sorted(set(segment.nodes) | static_closure(graph, segment.nodes, static))
    made = [{name for index in segment.nodes for name in graph.node[index].output} for segment in segments]
    read_after: dict[str, int] = {}  # the graph's own outputs are not passed on: statistics never read them (an LM's
    # logits, 49152 wide, would be the biggest tensor of the pass)
    for number, segment in enumerate(segments):
        reads = []
        for index in segment.nodes:
            for name in graph.node[index].input:
                if name and name not in initializers and name not in made[number] and name not in reads:
                    reads.append(name)
                    read_after[name] = max(read_after.get(name, -1), number)
        segment.inputs = reads
    for number, segment in enumerate(segments):
        segment.outputs = [name for index in segment.nodes for name in graph.node[index].output
                           if name and name not in static and read_after.get(name, -1) > number]


@dataclass
class SegmentPlan:
    """The segments of one model for one set of requests, with what building their graphs needs."""

    model: onnx.ModelProto
    segments: list[Segment]
    types: dict[str, onnx.TypeProto]
    ranks: dict[str, int]
    masked: set[str]
    mask_name: str | None

    @classmethod
    def of(cls, model: onnx.ModelProto, requests: Sequence[TensorRequest], mask_name: str | None,
           max_gram_bytes: int, max_weight_bytes: int = SEGMENT_WEIGHT_BYTES) -> SegmentPlan | None:
        """The plan, or None when the graph cannot be cut (subgraphs, tensors shape inference cannot type): the
        caller then runs whole-model passes."""
        if has_subgraphs(model):
            return None
        types, ranks = inferred_types(model)
        unique = list({r.name: r for r in requests}.values())
        segments = plan_segments(model, unique, max_gram_bytes, max_weight_bytes)
        while len(segments) > 1 and not segments[-1].requests:  # nothing after the last request needs running
            segments.pop()
        if any(name not in types for segment in segments for name in segment.inputs + segment.outputs):
            return None
        for segment in segments:
            if mask_name is not None and mask_name not in segment.inputs and segment.requests:
                segment.inputs.append(mask_name)
        masked = token_tensors(gs.import_onnx(model), mask_name) if mask_name else set()
        return cls(model, segments, types, ranks, masked, mask_name)

    def groups(self, batches: Batches, threads: int = 0, on_batch: Callable[[], None] | None = None,
               external_dir: Path | None = None) -> Iterator[RequestGroup]:
        """Each segment's requests, collected in one forward pass over the data: each group must be collected in
        turn (a segment runs on the tensors the one before it left)."""
        live = [dict(feed) for feed in batches()]  # per batch: the graph inputs, then each segment's outputs
        last_reader = {name: number for number, segment in enumerate(self.segments) for name in segment.inputs}
        for number, segment in enumerate(self.segments):
            sub = subgraph_model(self.model, segment.nodes, segment.inputs, segment.outputs, self.types)
            requests = [MomentRequest(r.name, r.dim) for r in segment.requests]
            sums_model = moment_graph(gs.import_onnx(sub), self.ranks, requests,
                                      self.mask_name if requests else None, keep=segment.outputs, masked=self.masked)

            def collect(number: int = number, segment: Segment = segment, sums_model: onnx.ModelProto = sums_model
                        ) -> dict[str, Moments]:
                moments = {r.name: Moments.zeros(r.dim) for r in segment.requests}
                feeds = ({name: state[name] for name in segment.inputs} for state in live)
                for state, values in zip(live, sums_per_batch(sums_model, threads, feeds, on_batch, external_dir)):
                    add_batch_sums(moments, segment.requests, values)
                    state.update(zip(segment.outputs, values[3 * len(segment.requests):]))
                    for name in [n for n in state if last_reader.get(n, -1) <= number]:
                        del state[name]
                return moments

            yield RequestGroup(segment.requests, collect)
