"""The calibration stage: moments of every linear layer's input tensor over the calibration samples, served
by the statistics cache when the same model and samples were calibrated before."""

from __future__ import annotations

import math

from lrdeploy.calib.data import Feeds, SampleSet
from lrdeploy.calib.stats import TensorRequest, collect_moments, count_passes
from lrdeploy.lowrank.moments import Moments
from lrdeploy.onnx_io import LoadedModel
from lrdeploy.pipeline.cache import StatisticsCache
from lrdeploy.pipeline.progress import SILENT, Progress


def calibrate(model: LoadedModel, requests: list[TensorRequest], samples: SampleSet, feeds: Feeds,
              cache: StatisticsCache, threads: int = 0, progress: Progress = SILENT) -> tuple[dict[str, Moments], bool]:
    """Moments of each requested tensor over `samples`; returns (moments, whether the cache served them)."""

    def collect() -> dict[str, Moments]:
        on_batch = progress.steps("calibrating", count_passes(requests) * math.ceil(samples.count / feeds.batch_size))
        return collect_moments(model.proto, requests, lambda: feeds.batches(samples), feeds.mask_name,
                               threads=threads, on_batch=on_batch)

    return cache.moments(samples, feeds.mask_name, [r.name for r in requests], collect)
