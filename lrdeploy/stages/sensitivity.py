"""Sensitivity allocation: how much the model's outputs degrade when each layer alone is cut to a rank.

One error-injected model (`passes.inject_error`) serves the measurements of a group of layers: each layer L
gets a weight error D_L and a bias error e_L fed at run time, so that its output becomes Y_L + X_L·D_L + e_L.
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
from lrdeploy.passes.error_reach import cut_at_errors
from lrdeploy.passes.inject_error import error_injected_model
from lrdeploy.passes.moment_graph import inferred_types
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.calib.cache import SensitivityTable, StatisticsCache
from lrdeploy.settings.build import BuildConfig
from lrdeploy.progress import Progress
from lrdeploy.stages.distortion import DistortionProbe
from lrdeploy.runtime.onnxruntime import create_session

GROUP_SIZE = 6


def candidate_ranks(shape: LayerShape, multiple: int, count: int = 3) -> list[int]:
    """`count` ranks spread from one multiple to just under the break-even rank, snapped to the multiple."""
    top = max(multiple, int((shape.dense_params / (shape.d_in + shape.d_out) - 1) // multiple) * multiple)
    ranks = {max(multiple, int(round(f * top / multiple)) * multiple) for f in np.linspace(0, 1, count)}
    return sorted(k for k in ranks if shape.saves(k))


LayerError = tuple[Hashable, Callable[[], tuple[np.ndarray, np.ndarray]]]  # (key, () -> (weight error, bias error))


def measure_layer_errors(
    model: onnx.ModelProto, variants: list[tuple[LinearLayer, list[LayerError]]],
    batches: Iterable[dict[str, np.ndarray]], threads: int = 0, on_step: Callable[[], None] | None = None,
    group_size: int = GROUP_SIZE, mask_name: str | None = None, jobs: Jobs = SERIAL,
) -> dict[Hashable, float]:
    """Degradation of the outputs for each variant: one layer's weight and bias changed by the errors its
    callable makes (made when measured, so that only one is held at a time), every other layer as it is.

    Layers are injected `group_size` at a time (`passes.inject_error`): each injection adds one dense-sized MatMul
    to every run, so small groups keep runs cheap while few groups keep session creation cheap. One session serves
    every variant of its group: no model is copied per variant. Each group is one of `jobs` (a Ray task with
    `--ray`), measured against the dense outputs computed once here."""
    probe = DistortionProbe(model, batches, threads, mask_name)
    groups = [variants[start:start + group_size] for start in range(0, len(variants), group_size)]

    def done(group_measured: dict[Hashable, float]) -> None:
        for _ in group_measured if on_step is not None else ():
            on_step()

    types, _ = inferred_types(model)
    measured: dict[Hashable, float] = {}
    for group_measured in jobs.map(measure_group, groups, (model, probe, jobs.threads(threads), types), done):
        measured.update(group_measured)
    return measured


def measure_group(group: list[tuple[LinearLayer, list[LayerError]]],
                  shared: tuple[onnx.ModelProto, DistortionProbe, int, dict[str, onnx.TypeProto]]
                  ) -> dict[Hashable, float]:
    """One group's variants, through one error-injected model run from where its errors act (a job of
    `measure_layer_errors`; `types`: the model's tensor types)."""
    model, probe, threads, types = shared
    injected, error_inputs = error_injected_model(model, [layer for layer, _ in group])
    runs = InjectedRuns(injected, {name for inputs in error_inputs for name in (inputs.weight, inputs.bias)},
                        types, probe.batches, threads)
    zeros = {name: value for (layer, _), inputs in zip(group, error_inputs)
             for name, value in inputs.zeros(layer).items()}
    measured: dict[Hashable, float] = {}
    for (layer, errors), inputs in zip(group, error_inputs):
        for key, make in errors:
            delta_w, delta_b = make()
            measured[key] = probe.of_outputs(runs.outputs(probe.names, {
                **zeros, inputs.weight: delta_w.astype(layer.dtype), inputs.bias: delta_b.astype(layer.dtype)}))
    return measured


class InjectedRuns:
    """The error-injected model's outputs on fixed batches for any fed errors: the part no error reaches runs once
    per batch, the rest per call (`passes.error_reach`); the whole model per call where it cannot be cut."""

    def __init__(self, injected: onnx.ModelProto, error_names: set[str], types: dict[str, onnx.TypeProto],
                 batches: list[dict[str, np.ndarray]], threads: int):
        self.batches = batches
        self.cut = cut_at_errors(injected, error_names, types)
        self.before: list[dict[str, np.ndarray]] = [{} for _ in batches]  # per batch, what runs once
        if self.cut is None:
            self.session = create_session(injected, threads)
            return
        if self.cut.before is not None:
            before = create_session(self.cut.before, threads)
            names = self.cut.crossing + self.cut.unreached_outputs
            for values, feed in zip(self.before, batches):
                values.update(zip(names, before.run(names, {name: feed[name] for name in self.cut.before_inputs})))
        self.session = create_session(self.cut.after, threads)

    def outputs(self, names: list[str], errors: dict[str, np.ndarray]) -> list[list[np.ndarray]]:
        """Per batch, the outputs `names` with `errors` fed."""
        if self.cut is None:
            return [self.session.run(names, {**feed, **errors}) for feed in self.batches]
        outputs = []
        for feed, before in zip(self.batches, self.before):
            available = {**feed, **before, **errors}
            run = [name for name in names if name not in before]
            after = dict(zip(run, self.session.run(run, {name: available[name] for name in self.cut.after_inputs})))
            outputs.append([before[name] if name in before else after[name] for name in names])
        return outputs


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
    variants = [(layer, [((layer.name, rank), rank_error(layer, decompositions[layer.name], rank))
                         for rank in candidate_ranks(layer.shape, multiple)]) for layer in layers]
    measured = measure_layer_errors(model, variants, batches, threads, on_step, group_size, mask_name, jobs)
    table: SensitivityTable = {layer.name: {} for layer in layers}
    for (name, rank), loss in measured.items():
        table[name][rank] = loss
    return table


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


def measured_sensitivity(model: onnx.ModelProto, layers: list[LinearLayer], decompositions: dict[str, Decomposition],
                         probe: SampleSet, feeds: Feeds, config: BuildConfig, cache: StatisticsCache,
                         progress: Progress, jobs: Jobs = SERIAL) -> SensitivityTable:
    """The sensitivity table of `layers` from the cache, or measured on the `probe` samples (and cached); measured
    as `jobs` (Ray tasks with `--ray`)."""
    def measure() -> SensitivityTable:
        on_step = progress.steps("measuring sensitivity", count_measurements(layers, config.factorization.rank_multiple))
        return measure_sensitivity(model, layers, decompositions, config.factorization.rank_multiple, feeds.batches(probe),
                                   config.threads, on_step, mask_name=feeds.mask_name, jobs=jobs)

    settings = f"{feeds.mask_name}|{config.factorization.method}|{config.factorization.rank_multiple}|kl-for-logits"  # the distortion measured
    return cache.sensitivity(probe, settings, {layer.name for layer in layers}, measure)
