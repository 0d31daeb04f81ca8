"""Latency measurement the way trtexec does it: warm-up, then timed synchronised runs.

With several runners the runs alternate (A, B, A, B, …) inside one loop, so a noisy shared machine
slows all of them alike and their ratio stays meaningful.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from lrdeploy.runtime.base import Runner


@dataclass
class LatencyStats:
    """Latency percentiles (ms) of one runner at one shape, and the throughput they imply."""

    runs: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    min_ms: float
    max_ms: float
    inferences_per_s: float
    tokens_per_s: float

    @classmethod
    def from_times(cls, times_ms: list[float], batch: int, seq: int) -> "LatencyStats":
        t = np.asarray(times_ms, np.float64)
        mean = float(t.mean())
        return cls(
            runs=len(t), mean_ms=mean, p50_ms=float(np.percentile(t, 50)), p90_ms=float(np.percentile(t, 90)),
            p95_ms=float(np.percentile(t, 95)), p99_ms=float(np.percentile(t, 99)), min_ms=float(t.min()),
            max_ms=float(t.max()), inferences_per_s=1e3 * batch / mean, tokens_per_s=1e3 * batch * seq / mean,
        )


@dataclass
class ShapeResult:
    batch: int
    seq: int
    latency: dict[str, LatencyStats]
    ratio_p50: float | None = None  # second runner over first
    ratio_mean: float | None = None
    past: int | None = None  # a model with a KV cache: the past length fed (0: prefill; else a decode step)

    @property
    def label(self) -> str:
        """The shape as reports name it: batch × sequence, and for a decoder with a KV cache its phase."""
        if self.past is None:
            return f"{self.batch} × {self.seq}"
        if self.past == 0:
            return f"prefill {self.batch} × {self.seq}"
        return f"decode {self.batch} × {self.seq} over {self.past} past"


@dataclass
class BenchSettings:
    warmup: int = 3
    iterations: int | None = 20
    duration_s: float | None = None

    def keep_going(self, done: int, started: float) -> bool:
        if self.duration_s is not None:
            return time.perf_counter() - started < self.duration_s or done == 0  # at least one run
        return done < (self.iterations or 1)


TIMED = ("device work per run: inputs and outputs resident where the runner keeps them (ONNX Runtime I/O binding, "
         "torch tensors on the device), synchronised after each run; no host↔device copy in the timed region")


@dataclass
class BenchResult:
    backend: str
    precision: str
    device: str
    versions: dict[str, str]
    models: list[str]
    shapes: list[ShapeResult] = field(default_factory=list)
    optimize: str = "none"  # "ort": every model ran as ONNX Runtime's transformer optimizer fuses it
    timed: str = TIMED
    fused_ops: dict[str, dict[str, int]] = field(default_factory=dict)  # {model: {fused op: count}}


def time_shape(runners: list[Runner], feed: dict[str, np.ndarray], settings: BenchSettings,
               clock: Callable[[], float] | None = None) -> dict[str, list[float]]:
    """Bind `feed` to every runner (outside the timed region), warm them up, then time them alternately; returns
    milliseconds per run per runner. A run is the device's work only: inputs and outputs stay where the runner
    keeps them (`Runner.bind`), and each run waits for the device."""
    clock = clock or time.perf_counter
    for runner in runners:
        runner.bind(feed)
    for _ in range(settings.warmup):
        for runner in runners:
            runner.run_bound()
    times: dict[str, list[float]] = {runner.name: [] for runner in runners}
    started = time.perf_counter()
    done = 0
    while settings.keep_going(done, started):
        for runner in runners:
            begin = clock()
            runner.run_bound()
            times[runner.name].append((clock() - begin) * 1e3)
        done += 1
    return times


Shape = tuple[int, int, "int | None"]  # (batch, new tokens per sample, past length or None without a KV cache)


def benchmark(runners: list[Runner], make_feed: Callable[[int, int, "int | None"], dict[str, np.ndarray]],
              shapes: list[Shape], settings: BenchSettings,
              on_shape: Callable[[ShapeResult], None] | None = None) -> BenchResult:
    """Latency of each runner at each shape; the ratio compares runner 2 to runner 1."""
    for runner in runners:
        runner.activate()
    try:
        first = runners[0]
        result = BenchResult(first.backend, first.precision, first.device, first.versions(), [r.name for r in runners])
        for batch, seq, past in shapes:
            times = time_shape(runners, make_feed(batch, seq, past), settings)
            stats = {name: LatencyStats.from_times(t, batch, seq) for name, t in times.items()}
            shape = ShapeResult(batch, seq, stats, past=past)
            if len(runners) == 2:
                a, b = (stats[r.name] for r in runners)
                shape.ratio_p50, shape.ratio_mean = b.p50_ms / a.p50_ms, b.mean_ms / a.mean_ms
            result.shapes.append(shape)
            if on_shape is not None:
                on_shape(shape)
        return result
    finally:
        for runner in runners:
            runner.deactivate()


def result_from_dict(data: dict) -> BenchResult:
    """Rebuild a BenchResult from its dataclasses.asdict form (as stored in report.json and bench.json)."""
    shapes = [
        ShapeResult(s["batch"], s["seq"], {n: LatencyStats(**v) for n, v in s["latency"].items()}, s["ratio_p50"],
                    s["ratio_mean"], s.get("past"))
        for s in data["shapes"]
    ]
    return BenchResult(data["backend"], data["precision"], data["device"], data["versions"], data["models"], shapes,
                       optimize=data.get("optimize", "none"), timed=data.get("timed", TIMED),
                       fused_ops=data.get("fused_ops", {}))
