"""The calibration stage: moments of every linear layer's input tensor over the calibration samples, served
by the statistics cache when the same model and samples were calibrated before."""

from __future__ import annotations

import math
from typing import Iterator

import numpy as np

from lrdeploy.calib.data import Feeds, SampleSet
from lrdeploy.calib import segments
from lrdeploy.calib.segments import SegmentPlan
from lrdeploy.calib.stats import RequestGroup, TensorRequest, collect_moments, count_passes, moments_by_group
from lrdeploy.errors import CalibrationDataError
from lrdeploy.lowrank.moments import Moments
from lrdeploy.onnx_io import LoadedModel
from lrdeploy.calib.cache import StatisticsCache
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.progress import SILENT, Progress


def check_moments(moments: dict[str, Moments]) -> None:
    """Statistics a decomposition can trust are finite (NaN or overflow mean the inputs drive the model out of
    float32's range)."""
    for name, m in moments.items():
        if not (np.isfinite(m.total).all() and np.isfinite(m.gram).all()):
            raise CalibrationDataError(
                f"the statistics of {name!r} are not finite (NaN or overflow): the calibration inputs drive the model "
                "outside float32's range; check them for huge values (e.g. 1e30)"
            )


def too_few_positions(name: str, m: Moments, mask_name: str | None) -> str:
    """Why `name`'s statistics cannot be trusted: fewer positions than it is wide (its covariance is then
    rank-deficient; none means the data had no real token at all)."""
    mask = f"; positions where {mask_name!r} is 0 do not count" if mask_name else ""
    return (f"calibration counted {m.count:.0f} positions of {name!r}, fewer than its width {m.dim}, so its "
            f"statistics cannot be trusted{mask}; give a calibration file with more samples (at least {m.dim} "
            "positions must reach this tensor)")


def thin_tensors(moments: dict[str, Moments]) -> set[str]:
    """The tensors calibrated over fewer positions than they are wide (a pooler or classifier reads one row per
    sample: a BERT-base classifier needs 768 samples)."""
    return {name for name, m in moments.items() if m.count < m.dim}


def calibrate(model: LoadedModel, requests: list[TensorRequest], samples: SampleSet, feeds: Feeds,
              cache: StatisticsCache, threads: int = 0, progress: Progress = SILENT) -> tuple[dict[str, Moments], bool]:
    """Moments of each requested tensor over `samples`; returns (moments, whether the cache served them)."""

    def collect() -> dict[str, Moments]:
        on_batch = progress.steps("calibrating", count_passes(requests) * math.ceil(samples.count / feeds.batch_size))
        moments = collect_moments(model.proto, requests, lambda: feeds.batches(samples), feeds.mask_name,
                                  threads=threads, on_batch=on_batch)
        check_moments(moments)  # before anything is cached
        return moments

    return cache.moments(samples, feeds.mask_name, [r.name for r in requests], collect)


def calibrated_groups(model: LoadedModel, requests: list[TensorRequest], samples: SampleSet, feeds: Feeds,
                      cache: StatisticsCache, threads: int = 0, progress: Progress = SILENT
                      ) -> Iterator[tuple[dict[str, Moments], bool]]:
    """`calibrate` one group of tensors at a time: the caller decomposes a group's layers and frees its moments
    before the next group is collected. The groups are the model's segments (`calib.segments`: one forward pass
    in all, one segment's weights in a session), or, where the graph cannot be cut, groups of tensors whose Gram
    matrices fit the limit (one whole-model pass each). Each group is cached on its own. Yields (moments,
    whether the cache served them)."""
    plan = SegmentPlan.of(model.proto, requests, feeds.mask_name, segments.SEGMENT_GRAM_BYTES)
    if plan is not None:
        yield from _calibrated_segments(plan, model, samples, feeds, cache, threads, progress)
        return
    on_batch = progress.steps("calibrating", count_passes(requests) * math.ceil(samples.count / feeds.batch_size))
    for group in moments_by_group(model.proto, requests, lambda: feeds.batches(samples), feeds.mask_name,
                                  threads=threads, on_batch=on_batch, external_dir=model.mapped_dir):
        def collect(group: RequestGroup = group) -> dict[str, Moments]:
            moments = group.collect()
            check_moments(moments)  # before anything is cached
            return moments

        yield cache.moments(samples, feeds.mask_name, group.names, collect, per_group=True)


def _calibrated_segments(plan: SegmentPlan, model: LoadedModel, samples: SampleSet, feeds: Feeds,
                         cache: StatisticsCache, threads: int, progress: Progress
                         ) -> Iterator[tuple[dict[str, Moments], bool]]:
    """The segments' moments, from the cache when every segment is there (read one at a time), else computed:
    a segment runs on the tensors the one before it left, so a pass runs them all, and yields those the cache
    did not serve."""
    names = [[r.name for r in segment.requests] for segment in plan.segments]
    served = 0
    if all(cache.has_moments(samples, feeds.mask_name, group, per_group=True) for group in names):
        for group in names:
            moments = cache.cached_moments(samples, feeds.mask_name, group, per_group=True)
            if moments is None:  # damaged: computed again from here on
                break
            served += 1
            yield moments, True
            del moments
        else:
            return
    on_batch = progress.steps("calibrating", len(plan.segments) * math.ceil(samples.count / feeds.batch_size))
    for number, group in enumerate(plan.groups(lambda: feeds.batches(samples), threads, on_batch, model.mapped_dir)):
        moments = group.collect()
        if number < served:
            continue
        check_moments(moments)  # before anything is cached
        cache.store_moments(samples, feeds.mask_name, moments, per_group=True)
        yield moments, False
        del moments  # not held while the next segment is collected


def keep_thin_layers_dense(eligible: list[LinearLayer], moments: dict[str, Moments], mask_name: str | None,
                           progress: Progress, require_some: bool = True) -> list[LinearLayer]:
    """The eligible layers whose input was calibrated over enough positions; the others (a classifier or pooler
    reading one row per sample, with fewer samples than its width) stay dense with the reason, instead of stopping
    the build. The structured cuts' own statistics must be trustworthy: too few positions there is an error; so
    are none left at all, unless `require_some` is off (one group of several, checked by the caller)."""
    thin = thin_tensors(moments)
    needed = thin - {layer.input_name for layer in eligible}
    if needed:
        name = sorted(needed)[0]
        raise CalibrationDataError(too_few_positions(name, moments[name], mask_name))
    kept = [layer for layer in eligible if layer.input_name not in thin]
    if thin and not kept and require_some:
        name = sorted(thin)[0]
        raise CalibrationDataError(too_few_positions(name, moments[name], mask_name))
    for layer in eligible:
        if layer.input_name in thin:
            m = moments[layer.input_name]
            layer.eligible = False
            layer.reason = (f"kept dense: calibration counted {m.count:.0f} positions of its input, fewer than its "
                            f"width {m.dim} (one row per sample, as a pooler or classifier reads); give at least "
                            f"{m.dim} samples to compress it")
            progress.warn(f"{layer.name}: {layer.reason}")
    return kept
