"""Per-shape latency of a dense linear layer against its factorized pair, on the target backend.

Two unfused GEMMs can be slower than one dense GEMM (small token counts, ranks that tile badly), so
FLOPs alone do not decide whether a split pays. For each distinct (d_in, d_out) this builds two tiny
ONNX graphs, X[tokens, d_in]·W + b and X·A·B + c, and times them alternately on ONNX Runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from lrdeploy.runtime.onnxruntime import PROVIDERS, check_provider, create_session

Shape = tuple[int, int]


@dataclass
class ShapeTiming:
    """Median milliseconds of the dense layer and of the split at each measured rank."""

    d_in: int
    d_out: int
    tokens: int
    dense_ms: float
    split_ms: dict[int, float] = field(default_factory=dict)

    def speedup(self, rank: int) -> float:
        """Dense time over split time: above 1 the split pays."""
        return self.dense_ms / self.split_ms[rank]


def layer_model(d_in: int, d_out: int, rank: int | None, seed: int = 0) -> onnx.ModelProto:
    """X ─MatMul(W)─Add(b)→ Y when `rank` is None, else X ─MatMul(A)─MatMul(B)─Add(c)→ Y (float32, opset 17)."""
    rng = np.random.default_rng(seed)
    inits, nodes = [], []

    def weight(name, shape):
        inits.append(numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name))
        return name

    if rank is None:
        nodes.append(helper.make_node("MatMul", ["x", weight("W", (d_in, d_out))], ["xw"]))
    else:
        nodes.append(helper.make_node("MatMul", ["x", weight("A", (d_in, rank))], ["xa"]))
        nodes.append(helper.make_node("MatMul", ["xa", weight("B", (rank, d_out))], ["xw"]))
    nodes.append(helper.make_node("Add", ["xw", weight("b", (d_out,))], ["y"]))
    graph = helper.make_graph(nodes, "layer", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["tokens", d_in])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["tokens", d_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8  # the IR version of opset 17; newer onnx defaults to one ONNX Runtime may not read yet
    return model


def time_shapes(ranks_by_shape: dict[Shape, set[int]], tokens: int, device: str = "cpu", threads: int = 0,
                iterations: int = 15, warmup: int = 3) -> dict[Shape, ShapeTiming]:
    """Time dense vs split for every shape and rank, runs alternated; returns median ms per variant."""
    provider = PROVIDERS[device]
    check_provider(provider)
    timings = {}
    for (d_in, d_out), ranks in ranks_by_shape.items():
        variants = [None, *sorted(ranks)]
        sessions = [create_session(layer_model(d_in, d_out, r), threads, [provider]) for r in variants]
        feed = {"x": np.random.default_rng(1).standard_normal((tokens, d_in)).astype(np.float32)}
        for _ in range(warmup):
            for session in sessions:
                session.run(None, feed)
        times: list[list[float]] = [[] for _ in variants]
        for _ in range(iterations):
            for index, session in enumerate(sessions):
                start = time.perf_counter()
                session.run(None, feed)
                times[index].append((time.perf_counter() - start) * 1e3)
        medians = [float(np.median(t)) for t in times]
        timings[(d_in, d_out)] = ShapeTiming(d_in, d_out, tokens, medians[0], dict(zip(variants[1:], medians[1:])))
    return timings
