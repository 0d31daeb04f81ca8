"""Sensitivity allocation: how much the model's outputs degrade when each layer alone is cut to a rank.

One error-injected model (`passes.inject_error`) of the part of the model a group of layers reaches
(`passes.error_reach`: the rest runs once, in a dense pass; `stages.error_runs`) serves the measurements of the
group — for a causal LM, the rest of the layer's block, scaled from there to the outputs (`stages.block_reach`).
Each layer L gets a weight error D_L and a bias error e_L fed at run time, so that its output becomes Y_L + X_L·D_L + e_L.
Cutting L alone to rank k is exactly D_L = A_k·B_k − W, e_L = c_k − b (its input is unchanged, since only L
is cut); every other layer gets zeros. Degradation is 1 − cosine per sample against the dense outputs (KL per
next-token position for a causal LM's logits: `stages.distortion`), averaged over samples and outputs, on a few
calibration batches. Layers are measured at a few ranks and
interpolated along their spectrum (linearly in discarded energy); the allocation is the greedy knapsack of
`lowrank.allocate.greedy_ranks` on those curves.
"""

from __future__ import annotations

from typing import Callable, Hashable, Iterable

import numpy as np
import onnx

from lrdeploy.calib.data import Feeds, SampleSet
from lrdeploy.jobs import SERIAL, Jobs, one_blas_thread
from lrdeploy.lowrank.allocate import LayerShape, discarded_fraction
from lrdeploy.lowrank.decompose import Decomposition
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.calib.cache import SensitivityTable, StatisticsCache
from lrdeploy.settings.build import BuildConfig
from lrdeploy.progress import Progress
from lrdeploy.stages.block_reach import BlockEnd, measure_at_block_ends
from lrdeploy.stages.error_runs import GROUP_SIZE, LayerError, measure_layer_errors
from lrdeploy.stages.samples import is_causal_lm


def candidate_ranks(shape: LayerShape, multiple: int, count: int = 3) -> list[int]:
    """`count` ranks spread from one multiple to just under the break-even rank, snapped to the multiple."""
    top = max(multiple, int((shape.dense_params / (shape.d_in + shape.d_out) - 1) // multiple) * multiple)
    ranks = {max(multiple, int(round(f * top / multiple)) * multiple) for f in np.linspace(0, 1, count)}
    return sorted(k for k in ranks if shape.saves(k))


def rank_error(layer: LinearLayer, decomposition: Decomposition, rank: int) -> Callable[[], tuple[np.ndarray, np.ndarray]]:
    """The error that cutting `layer` alone to `rank` makes: D = A·B − W, e = c − b."""
    def make() -> tuple[np.ndarray, np.ndarray]:
        with one_blas_thread():  # a job's products: the same bits as a Ray task's
            factors = decomposition.factors(rank)
            product = factors.dense_weight()
        bias = np.zeros(layer.d_out) if layer.bias is None else np.asarray(layer.bias, np.float64)
        return (product - np.asarray(layer.weight, np.float64),
                (0 if factors.bias is None else factors.bias) - bias)
    return make


def measure_sensitivity(
    model: onnx.ModelProto, layers: list[LinearLayer], decompositions: dict[str, Decomposition], multiple: int,
    batches: Iterable[dict[str, np.ndarray]], threads: int = 0, on_step: Callable[[], None] | None = None,
    group_size: int = GROUP_SIZE, mask_name: str | None = None, jobs: Jobs = SERIAL,
) -> SensitivityTable:
    """Degradation of the outputs when each layer alone is cut to each of its candidate ranks."""
    measured = measure_layer_errors(model, rank_variants(layers, decompositions, multiple), batches, threads, on_step,
                                    group_size, mask_name, jobs)
    return table_of(measured, layers)


def sensitivity_loss(table: SensitivityTable, energies: dict[str, np.ndarray]) -> Callable[[LayerShape, int | None], float]:
    """A loss curve per layer: measured degradation, interpolated between measured ranks linearly in the
    normalized energy the truncation discards (0 loss when dense or when nothing is discarded)."""
    def discarded(name: str, rank: int) -> float:
        return discarded_fraction(energies[name], rank)

    def loss(shape: LayerShape, rank: int | None) -> float:
        if rank is None:
            return 0.0
        points = table[shape.name]
        xs = [0.0] + [discarded(shape.name, k) for k in sorted(points, reverse=True)]
        ys = [0.0] + [points[k] for k in sorted(points, reverse=True)]
        order = np.argsort(xs)
        return float(np.interp(discarded(shape.name, rank), np.asarray(xs)[order], np.asarray(ys)[order]))

    return loss


def count_measurements(layers: list[LinearLayer], multiple: int) -> int:
    return sum(len(candidate_ranks(layer.shape, multiple)) for layer in layers)


def rank_variants(layers: list[LinearLayer], decompositions: dict[str, Decomposition], multiple: int
                  ) -> list[tuple[LinearLayer, list[LayerError]]]:
    """Each layer cut alone to each of its candidate ranks, keyed (name, rank)."""
    return [(layer, [((layer.name, rank), rank_error(layer, decompositions[layer.name], rank))
                     for rank in candidate_ranks(layer.shape, multiple)]) for layer in layers]


def table_of(measured: dict[Hashable, float], layers: list[LinearLayer]) -> SensitivityTable:
    table: SensitivityTable = {layer.name: {} for layer in layers}
    for (name, rank), loss in measured.items():
        table[name][rank] = loss
    return table


def measured_sensitivity(model: onnx.ModelProto, layers: list[LinearLayer], decompositions: dict[str, Decomposition],
                         probe: SampleSet, feeds: Feeds, config: BuildConfig, cache: StatisticsCache,
                         progress: Progress, jobs: Jobs = SERIAL, blocks: list[BlockEnd | None] = ()) -> SensitivityTable:
    """The sensitivity table of `layers` from the cache, or measured on the `probe` samples (and cached); measured
    as `jobs` (Ray tasks with `--ray`), at the ends of `blocks` where the reach is "block"
    (`stages.block_reach`)."""
    at_block_ends = reaches_block_ends(config, model) and any(block is not None for block in blocks)
    multiple = config.factorization.rank_multiple

    def measure() -> SensitivityTable:
        variants = rank_variants(layers, decompositions, multiple)
        if at_block_ends:
            measured = measure_at_block_ends(model, list(blocks), variants, feeds.batches(probe), config.threads,
                                             lambda total: progress.steps("measuring sensitivity", total),
                                             feeds.mask_name, jobs)
        else:
            on_step = progress.steps("measuring sensitivity", count_measurements(layers, multiple))
            measured = measure_layer_errors(model, variants, feeds.batches(probe), config.threads, on_step,
                                            mask_name=feeds.mask_name, jobs=jobs)
        return table_of(measured, layers)

    settings = (f"{feeds.mask_name}|{config.factorization.method}|{multiple}|kl-for-logits"  # the distortion measured
                + ("|at-block-ends" if at_block_ends else ""))
    return cache.sensitivity(probe, settings, {layer.name for layer in layers}, measure)


def reaches_block_ends(config: BuildConfig, model: onnx.ModelProto) -> bool:
    """Whether measured options are taken at their block's end (`--sensitivity-reach`; auto: for a causal LM)."""
    reach = config.planning.sensitivity_reach
    return reach == "block" or (reach == "auto" and is_causal_lm(model))
