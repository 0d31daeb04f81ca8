"""Per-shape latency of a dense linear layer against its factorized pair, on the target backend.

Two unfused GEMMs can be slower than one dense GEMM (small token counts, ranks that tile badly), so
FLOPs alone do not decide whether a split pays. For each distinct (d_in, d_out) this times the tiny
graphs of `passes.layer_graph` (X[tokens, d_in]·W + b and X·A·B + b) alternately on ONNX Runtime, or the
same layers as PyTorch modules (for `lrdeploy profile --backend torch-cuda`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from lrdeploy.bench.feeds import check_input_memory
from lrdeploy.bench.measure import BenchSettings, time_shape
from lrdeploy.passes.layer_graph import INPUT, layer_model
from lrdeploy.passes.precision import to_float16
from lrdeploy.runtime.base import Runner
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


def _ort_runner(d_in: int, d_out: int, rank: int | None, device: str, threads: int, precision: str) -> Runner:
    model = layer_model(d_in, d_out, rank)
    return OrtRunner(to_float16(model) if precision == "fp16" else model, device, threads, f"rank {rank}", precision)


def _torch_runner(d_in: int, d_out: int, rank: int | None, device: str, threads: int, precision: str) -> Runner:
    """The layer as PyTorch runs it: nn.Linear, or a LowRankLinear (two GEMMs), replayed as a CUDA graph on GPU."""
    import torch

    from lrdeploy.runtime.torch import TorchRunner
    from lrdeploy.torch.lowrank_linear import LowRankLinear

    class Layer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Linear(d_in, d_out) if rank is None else LowRankLinear(d_in, d_out, rank)

        def forward(self, **feed):
            return self.body(feed[INPUT])

    if threads:
        torch.set_num_threads(threads)
    return TorchRunner(Layer(), f"rank {rank}", device, precision)


RUNTIMES = {"ort": _ort_runner, "torch": _torch_runner}


def time_shapes(ranks_by_shape: dict[Shape, set[int]], tokens: int, device: str = "cpu", threads: int = 0,
                iterations: int = 15, warmup: int = 3, precision: str = "fp32",
                runtime: str = "ort") -> dict[Shape, ShapeTiming]:
    """Time dense vs split for every shape and rank on ONNX Runtime (or PyTorch: `runtime` "torch"), runs
    alternated and bound to the device (`measure.time_shape`); returns the median ms per variant. `precision`
    "fp16" times FP16 twins."""
    if runtime == "ort":
        check_provider(PROVIDERS[device])
    widest = max((d_in for d_in, _ in ranks_by_shape), default=0)
    check_input_memory(tokens * widest * 8, f"timing {tokens} tokens of width {widest}", "lower --tokens")
    timings = {}
    for (d_in, d_out), ranks in ranks_by_shape.items():
        variants = [None, *sorted(ranks)]
        runners = [RUNTIMES[runtime](d_in, d_out, rank, device, threads, precision) for rank in variants]
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
