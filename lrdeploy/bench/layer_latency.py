"""Per-shape latency of a dense linear layer against its factorized pair, on the target backend.

Two unfused GEMMs can be slower than one dense GEMM (small token counts, ranks that tile badly), so
FLOPs alone do not decide whether a split pays. For each distinct (d_in, d_out) this times the tiny
graphs of `passes.layer_graph` (X[tokens, d_in]·W + b and X·A·B + b) alternately on ONNX Runtime.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from lrdeploy.passes.layer_graph import INPUT, layer_model
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


def time_shapes(ranks_by_shape: dict[Shape, set[int]], tokens: int, device: str = "cpu", threads: int = 0,
                iterations: int = 15, warmup: int = 3) -> dict[Shape, ShapeTiming]:
    """Time dense vs split for every shape and rank, runs alternated; returns median ms per variant."""
    provider = PROVIDERS[device]
    check_provider(provider)
    timings = {}
    for (d_in, d_out), ranks in ranks_by_shape.items():
        variants = [None, *sorted(ranks)]
        sessions = [create_session(layer_model(d_in, d_out, r), threads, [provider]) for r in variants]
        feed = {INPUT: np.random.default_rng(1).standard_normal((tokens, d_in)).astype(np.float32)}
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
