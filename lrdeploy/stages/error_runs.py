"""Runs of error-injected sessions: each variant of a group of layers (their weights and biases changed by
errors fed at run time, `passes.inject_error`) through the part of the model the group reaches
(`passes.error_reach`), fed what that part reads from one dense pass, and scored against the dense model: at
its outputs (`stages.distortion`), or at a horizon tensor as a squared change (`stages.block_reach`).
What sensitivity allocation, the unified plan's structured options and the block-end measurements share."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Hashable, Iterable, Sequence

import numpy as np
import onnx

from lrdeploy.errors import InternalError
from lrdeploy.jobs import SERIAL, Jobs
from lrdeploy.passes.error_reach import SuffixPlan, plan_suffix
from lrdeploy.passes.inject_error import error_injected_model
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.moment_graph import inferred_types
from lrdeploy.runtime.onnxruntime import create_session
from lrdeploy.stages.distortion import DistortionProbe

GROUP_SIZE = 6


ErrorMaker = Callable[[], tuple[np.ndarray, np.ndarray]]  # () -> (weight error, bias error)
LayerError = tuple[Hashable, ErrorMaker]


@dataclass
class ErrorGroup:
    """Layers injected into one session, and the variants measured on it: each variant sets the errors of some of
    the layers (by index into `layers`; the others stay zero). `horizon`: measured at this tensor, as the squared
    change per position against the dense model's (`stages.block_reach`), not at the model's outputs."""

    layers: list[LinearLayer]
    variants: list[tuple[Hashable, dict[int, ErrorMaker]]]
    horizon: str | None = None
    changes: frozenset = frozenset()  # keys of variants whose change at the horizon is returned too (per batch)


def single_layer_groups(variants: list[tuple[LinearLayer, list[LayerError]]],
                        group_size: int = GROUP_SIZE) -> list[ErrorGroup]:
    """Each layer's variants, `group_size` layers to a session."""
    chunks = [variants[start:start + group_size] for start in range(0, len(variants), group_size)]
    return [ErrorGroup([layer for layer, _ in chunk],
                       [(key, {index: make}) for index, (_, errors) in enumerate(chunk) for key, make in errors])
            for chunk in chunks]


def measure_layer_errors(
    model: onnx.ModelProto, variants: list[tuple[LinearLayer, list[LayerError]]],
    batches: Iterable[dict[str, np.ndarray]], threads: int = 0, on_step: Callable[[], None] | None = None,
    group_size: int = GROUP_SIZE, mask_name: str | None = None, jobs: Jobs = SERIAL,
) -> dict[Hashable, float]:
    """Degradation of the outputs for each variant: one layer's weight and bias changed by the errors its
    callable makes (made when measured, so that only one is held at a time), every other layer as it is.
    Layers are injected `group_size` at a time: each injection adds one dense-sized MatMul to every run, so small
    groups keep runs cheap while few groups keep session creation cheap."""
    return measure_error_groups(model, single_layer_groups(variants, group_size), batches, threads, on_step,
                                mask_name, jobs)[0]


def measure_error_groups(
    model: onnx.ModelProto, groups: list[ErrorGroup], batches: Iterable[dict[str, np.ndarray]], threads: int = 0,
    on_step: Callable[[], None] | None = None, mask_name: str | None = None, jobs: Jobs = SERIAL,
    types: dict[str, onnx.TypeProto] | None = None, keep: Sequence[str] = (), unscored: Collection[str] = (),
) -> tuple[dict[Hashable, float], dict[Hashable, list[np.ndarray]], DistortionProbe]:
    """Each group's variants through one error-injected session (`passes.inject_error`) of the part of the model
    its layers reach (`passes.error_reach`: up to its horizon where it has one), fed the tensors that part reads
    from one dense pass. One session serves every variant of its group: no model is copied per variant. Each
    group is one of `jobs` (a Ray task with `--ray`), measured against the dense outputs computed once here.
    `unscored`: graph outputs the errors may reach around a horizon (`block_reach.kv_cache_outputs`).
    Returns the distortions, the changes at their horizon of the variants that ask for them, and the dense pass
    (its `kept`: `keep`'s tensors per batch)."""
    types = types or inferred_types(model)[0]
    plans = [plan_suffix(model, group.layers, types, group.horizon, unscored) for group in groups]
    if any(plan is None and group.horizon is not None for group, plan in zip(groups, plans)):
        raise InternalError("a group measured at a horizon its layers' part of the model cannot stop at")
    horizons = [group.horizon for group in groups if group.horizon is not None]
    crossing = list(dict.fromkeys([*(name for plan in plans if plan is not None for name in plan.crossing), *horizons]))
    probe = DistortionProbe(model, batches, threads, mask_name, keep=list(dict.fromkeys([*crossing, *keep])),
                            types=types)
    scored = [probe.names[index] for index in probe.next_token]  # kept only as distributions: always run
    plans = [None if plan is None or (group.horizon is None and not set(scored) <= set(plan.outputs)) else plan
             for group, plan in zip(groups, plans)]
    items = [(group, plan, None if plan is None else [{name: kept[name] for name in plan.crossing + plan.outputs
                                                       if name in kept} for kept in probe.kept])
             for group, plan in zip(groups, plans)]
    probe.kept = [{name: kept[name] for name in keep} for kept in probe.kept]  # each item carries its own

    def done(result: tuple[dict[Hashable, float], dict]) -> None:
        for _ in result[0] if on_step is not None else ():
            on_step()

    measured: dict[Hashable, float] = {}
    changes: dict[Hashable, list[np.ndarray]] = {}
    for group_measured, group_changes in jobs.map(measure_group, items, (model, probe, jobs.threads(threads), types),
                                                  done):
        measured.update(group_measured)
        changes.update(group_changes)
    return measured, changes, probe


GroupItem = tuple[ErrorGroup, SuffixPlan | None, list[dict[str, np.ndarray]] | None]


def measure_group(item: GroupItem, shared: tuple[onnx.ModelProto, DistortionProbe, int, dict[str, onnx.TypeProto]]
                  ) -> tuple[dict[Hashable, float], dict[Hashable, list[np.ndarray]]]:
    """One group's variants through one error-injected session (a job of `measure_error_groups`): of the part
    of the model the group reaches (`plan`), fed the dense tensors it reads (`kept`, per batch, with the horizon's
    dense value where it has one), or of the whole model where it cannot be cut."""
    group, plan, kept = item
    model, probe, threads, types = shared
    injected, error_inputs = error_injected_model(model if plan is None else plan.model(model, types), group.layers)
    session = create_session(injected, threads)
    made = [output.name for output in injected.graph.output]
    feeds = []
    for batch, values in zip(probe.batches, kept or [{}] * len(probe.batches)):
        available = {**batch, **values}
        feeds.append({value.name: available[value.name] for value in injected.graph.input if value.name in available})
    zeros = {name: value for layer, inputs in zip(group.layers, error_inputs)
             for name, value in inputs.zeros(layer).items()}
    measured: dict[Hashable, float] = {}
    changes: dict[Hashable, list[np.ndarray]] = {}
    for key, errors in group.variants:
        fed = dict(zeros)
        for index, make in errors.items():
            delta_w, delta_b = make()
            layer, inputs = group.layers[index], error_inputs[index]
            fed.update({inputs.weight: delta_w.astype(layer.dtype), inputs.bias: delta_b.astype(layer.dtype)})
        runs = [dict(zip(made, session.run(made, {**feed, **fed}))) for feed in feeds]
        if group.horizon is not None:
            dense = [values[group.horizon] for values in kept]
            measured[key] = relative_change([run[group.horizon] for run in runs], dense, probe.masks())
            if key in group.changes:
                changes[key] = [run[group.horizon] - reference for run, reference in zip(runs, dense)]
        else:
            measured[key] = probe.of_outputs([[values.get(name, dense) for name, dense in zip(probe.names, reference)]
                                              for values, reference in zip(runs, probe.reference)])
    return measured, changes


def relative_change(outputs: list[np.ndarray], references: list[np.ndarray],
                    masks: list[np.ndarray | None]) -> float:
    """Mean over real positions (`masks`: 1 where a batch's position is real; None: all) of a tensor's squared
    change along its last axis relative to its squared norm there (a residual stream [batch, T, hidden]: what the
    next norm sees. Llama's first position carries activations a hundred times the others', which a norm scales
    away; an absolute change would be mostly that position's)."""
    total, count = 0.0, 0.0
    for output, reference, mask in zip(outputs, references, masks):
        dense = reference.astype(np.float64)
        per_position = (np.sum(np.square(output - dense), axis=-1)
                        / np.maximum(np.sum(np.square(dense), axis=-1), np.finfo(np.float64).tiny))
        weights = mask if mask is not None and mask.shape == per_position.shape else np.ones_like(per_position)
        total += float(np.sum(per_position * weights))
        count += float(np.sum(weights))
    return total / max(count, 1.0)
