"""Whole models timed side by side: each run of one model is followed by a run of the next, so a burst of other
work on a shared machine falls on all of them alike (`measure.time_shape`), on ONNX Runtime with I/O bound."""

from __future__ import annotations

import onnx

from lrdeploy.bench.feeds import timing_feed
from lrdeploy.bench.measure import BenchSettings, time_shape
from lrdeploy.calib.data import model_input_specs
from lrdeploy.runtime.onnxruntime import OrtRunner


def alternated_times(models: dict[str, onnx.ModelProto], device: str, threads: int, batch: int, seq: int,
                     iterations: int) -> dict[str, list[float]]:
    """Milliseconds of each of `models` (by name) per run, `iterations` runs each, alternated, on a batch × seq
    feed made for the first model's inputs (the models share their inputs)."""
    runners = [OrtRunner(proto, device, threads, name) for name, proto in models.items()]
    feed = timing_feed(model_input_specs(next(iter(models.values()))), batch, seq)
    for runner in runners:
        runner.activate()
    try:
        return time_shape(runners, feed, BenchSettings(warmup=2, iterations=iterations))
    finally:
        for runner in runners:
            runner.deactivate()
