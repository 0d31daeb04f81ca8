"""Sensitivity allocation: how much the model's outputs degrade when each layer alone is cut to a rank.

One error-injected model (`passes.inject_error`) of the part of the model a group of layers reaches
(`passes.error_reach`: the rest runs once, in a dense pass) serves the measurements of the group: each layer L
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
from lrdeploy.passes.error_reach import SuffixPlan, plan_suffix
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

    Layers are injected `group_size` at a time (`passes.inject_error`) into the part of the model they reach
    (`passes.error_reach`), fed the tensors it reads from one dense pass: each injection adds one dense-sized
    MatMul to every run, so small groups keep runs cheap while few groups keep session creation cheap. One session
    serves every variant of its group: no model is copied per variant. Each group is one of `jobs` (a Ray task
    with `--ray`), measured against the dense outputs computed once here."""
    groups = [variants[start:start + group_size] for start in range(0, len(variants), group_size)]
    types, _ = inferred_types(model)
    plans = [plan_suffix(model, [layer for layer, _ in group], types) for group in groups]
    crossing = list(dict.fromkeys(name for plan in plans if plan is not None for name in plan.crossing))
    probe = DistortionProbe(model, batches, threads, mask_name, keep=crossing, types=types)
    scored = [probe.names[index] for index in probe.next_token]  # kept only as distributions: always run
    plans = [None if plan is None or not set(scored) <= set(plan.outputs) else plan for plan in plans]
    items = [(group, plan, None if plan is None else [{name: kept[name] for name in plan.crossing}
                                                      for kept in probe.kept])
             for group, plan in zip(groups, plans)]
    probe.kept = []  # each item carries its own

    def done(group_measured: dict[Hashable, float]) -> None:
        for _ in group_measured if on_step is not None else ():
            on_step()

    measured: dict[Hashable, float] = {}
    for group_measured in jobs.map(measure_group, items, (model, probe, jobs.threads(threads), types), done):
        measured.update(group_measured)
    return measured


GroupItem = tuple[list[tuple[LinearLayer, list[LayerError]]], SuffixPlan | None, list[dict[str, np.ndarray]] | None]


def measure_group(item: GroupItem, shared: tuple[onnx.ModelProto, DistortionProbe, int, dict[str, onnx.TypeProto]]
                  ) -> dict[Hashable, float]:
    """One group's variants through one error-injected session (a job of `measure_layer_errors`): of the part
    of the model the group reaches (`plan`), fed the dense tensors it reads (`crossing`, per batch), or of the
    whole model where it cannot be cut."""
    group, plan, crossing = item
    model, probe, threads, types = shared
    layers = [layer for layer, _ in group]
    injected, error_inputs = error_injected_model(model if plan is None else plan.model(model, types), layers)
    session = create_session(injected, threads)
    made = [output.name for output in injected.graph.output]
    feeds = []
    for batch, values in zip(probe.batches, crossing or [{}] * len(probe.batches)):
        available = {**batch, **values}
        feeds.append({value.name: available[value.name] for value in injected.graph.input if value.name in available})
    zeros = {name: value for layer, inputs in zip(layers, error_inputs) for name, value in inputs.zeros(layer).items()}
    measured: dict[Hashable, float] = {}
    for (layer, errors), inputs in zip(group, error_inputs):
        for key, make in errors:
            delta_w, delta_b = make()
            fed = {**zeros, inputs.weight: delta_w.astype(layer.dtype), inputs.bias: delta_b.astype(layer.dtype)}
            outputs = []
            for feed, reference in zip(feeds, probe.reference):
                values = dict(zip(made, session.run(made, {**feed, **fed})))
                outputs.append([values.get(name, dense) for name, dense in zip(probe.names, reference)])
            measured[key] = probe.of_outputs(outputs)
    return measured


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
