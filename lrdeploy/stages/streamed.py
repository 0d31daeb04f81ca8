"""Calibrate and decompose group by group: a build whose statistics are bounded by one group of layers.

    for each group of input tensors whose Gram matrices fit the limit (one forward pass each):
        calibrate ─► moments of the group ─► decompose its layers (compact: the ranks a plan can use)
        ─► the report's spectra of its layers ─► free the moments, release the weight pages read

Used when nothing after decomposition needs the moments (the low-rank plan without structured cuts or refit);
otherwise `prepare_build` calibrates every tensor first, as the plans that measure options need.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from lrdeploy.calib.cache import StatisticsCache
from lrdeploy.calib.data import Feeds, SampleSet
from lrdeploy.calib import stats
from lrdeploy.calib.stats import TensorRequest, group_requests
from lrdeploy.errors import CalibrationDataError
from lrdeploy.lowrank.decompose import Decomposition, Method, decompose
from lrdeploy.lowrank.moments import Moments
from lrdeploy.onnx_io import LoadedModel
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.stages.spectra import layer_spectra, spectrum_layers
from lrdeploy.progress import StageTimer, return_freed_memory
from lrdeploy.stages.calibrate import calibrated_groups, keep_thin_layers_dense, too_few_positions
from lrdeploy.stages.memory import check_statistics_fit


@dataclass
class StreamedStatistics:
    """What the group-by-group stage leaves: the layers kept eligible, their decompositions, the report's spectra."""

    eligible: list[LinearLayer] = field(default_factory=list)
    decompositions: dict[str, Decomposition] = field(default_factory=dict)
    spectra: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    cached: bool = True


def check_largest_group_fits(eligible: list[LinearLayer], requests: list[TensorRequest]) -> None:
    """Stop with one line when one group's statistics would not fit (the whole model's need not). Sized as the
    whole-model passes group them, the larger of the two groupings (segments are smaller)."""
    groups = group_requests(list({r.name: r for r in requests}.values()), stats.DEFAULT_MAX_GRAM_BYTES)
    largest = max(groups, key=lambda group: sum(r.dim ** 2 for r in group))
    names = {r.name for r in largest}
    check_statistics_fit(largest, [layer for layer in eligible if layer.input_name in names])


def _timed(groups: Iterator[tuple[dict[str, Moments], bool]], timer: StageTimer
           ) -> Iterator[tuple[dict[str, Moments], bool]]:
    while True:
        with timer.stage("calibrate", part=True):
            group = next(groups, None)
        if group is None:
            return
        yield group
        del group  # the caller's group is freed before the next is collected


def streamed_statistics(model: LoadedModel, eligible: list[LinearLayer], samples: SampleSet, feeds: Feeds,
                        cache: StatisticsCache, method: Method, ceilings: dict[str, int], timer: StageTimer,
                        threads: int = 0) -> StreamedStatistics:
    """Moments, decompositions and spectra of `eligible`, one calibration group at a time (see the module)."""
    requests = [TensorRequest(layer.input_name, layer.d_in) for layer in eligible]
    check_largest_group_fits(eligible, requests)
    plotted = {layer.name for layer in spectrum_layers(eligible)}
    result, thin = StreamedStatistics(), None
    for moments, cached in _timed(calibrated_groups(model, requests, samples, feeds, cache, threads, timer.progress),
                                  timer):
        result.cached &= cached
        group = [layer for layer in eligible if layer.input_name in moments]
        kept = keep_thin_layers_dense(group, moments, feeds.mask_name, timer.progress, require_some=False)
        kept_names = {layer.name for layer in kept}
        thin = thin or next(((layer.input_name, moments[layer.input_name]) for layer in group
                             if layer.name not in kept_names), None)
        with timer.stage("decompose", part=True):
            for layer in kept:
                result.decompositions[layer.name] = decompose(method, layer.weight, layer.bias,
                                                              moments[layer.input_name], max_rank=ceilings[layer.name],
                                                              whole_spectrum=layer.name in plotted)
                if layer.name in plotted:
                    result.spectra[layer.name] = layer_spectra(layer, moments, result.decompositions)
            result.eligible += kept
            if model.weights is not None:
                model.weights.release()
        del moments
        return_freed_memory()
    if thin is not None and not result.eligible:
        raise CalibrationDataError(too_few_positions(thin[0], thin[1], feeds.mask_name))
    result.eligible = [layer for layer in eligible if layer.name in result.decompositions]  # the model's order
    result.spectra = {layer.name: result.spectra[layer.name] for layer in spectrum_layers(eligible)
                      if layer.name in result.spectra}
    timer.parts_done("calibrate", "decompose")
    return result
