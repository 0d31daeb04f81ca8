"""Per-shape latency of a dense linear layer against its factorized pair, on the target backend.

Two unfused GEMMs can be slower than one dense GEMM (small token counts, ranks that tile badly), so
FLOPs alone do not decide whether a split pays. For each distinct (d_in, d_out) this times the tiny
graphs of `passes.layer_graph` (X[tokens, d_in]·W + b and X·A·B + b) alternately on ONNX Runtime.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lrdeploy.bench.measure import BenchSettings, time_shape
from lrdeploy.passes.layer_graph import INPUT, layer_model
from lrdeploy.passes.precision import to_float16
from lrdeploy.runtime.onnxruntime import PROVIDERS, OrtRunner, check_provider

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
                iterations: int = 15, warmup: int = 3, precision: str = "fp32") -> dict[Shape, ShapeTiming]:
    """Time dense vs split for every shape and rank on ONNX Runtime, runs alternated and bound to the device
    (`measure.time_shape`); returns the median ms per variant. `precision` "fp16" times FP16 twins."""
    check_provider(PROVIDERS[device])
    timings = {}
    for (d_in, d_out), ranks in ranks_by_shape.items():
        variants = [None, *sorted(ranks)]
        runners = []
        for rank in variants:
            model = layer_model(d_in, d_out, rank)
            runners.append(OrtRunner(to_float16(model) if precision == "fp16" else model, device, threads,
                                     f"rank {rank}", precision))
        feed = {INPUT: np.random.default_rng(1).standard_normal((tokens, d_in)).astype(np.float32)}
        for runner in runners:
            runner.activate()
        try:
            times = time_shape(runners, feed, BenchSettings(warmup=warmup, iterations=iterations))
        finally:
            for runner in runners:
                runner.deactivate()
        medians = [float(np.median(times[runner.name])) for runner in runners]
        timings[(d_in, d_out)] = ShapeTiming(d_in, d_out, tokens, medians[0], dict(zip(variants[1:], medians[1:])))
    return timings
