"""Sensitivity measured at the end of each block, scaled to the model's outputs: what makes a language model's
plan affordable (`--sensitivity-reach block`, the default for a causal LM).

Measured at the model's outputs, every variant of a layer in block b runs blocks b…n, the LM head and a KL over
the vocabulary, in a session per group of layers. Measured here, it runs the rest of block b only
(`passes.error_reach` with a horizon: the residual stream where the block ends), and its distortion there is the
stream's squared change relative to its squared norm per position (what the next norm sees), d(v). Every way
from the block's layers to the outputs passes its end, so the change there decides the outputs' change exactly:
one session of the whole model with a change input at every block's end (`passes.inject_error.perturbable_model`) turns a change into the
outputs' distortion. That is run for a few variants only — per block and side (attention, FFN) a calibration
variant (each layer of the side at its middle variant, together), and each dropped block (its change is its
input minus its output: exact for any block) — and the other variants are scaled by their side's gain:

    loss(v) = d(v) · loss_outputs(calibration) / d(calibration)

    block b:  [layer errors] ─► rest of block b ─► stream at its end ─► d(v)       (every variant, small runs)
    model:    stream_b + change(calibration or drop) ─► blocks b+1…n, head ─► KL  (a few whole-model runs)

The gain assumes a side's errors move the outputs alike per unit of squared change at the block's end (KL is
quadratic in small changes). Layers outside a recognised block, or in a block whose stream cannot be cut at its
end, are measured at the outputs as before (`stages.error_runs`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable, Iterable

import numpy as np
import onnx

from lrdeploy.jobs import SERIAL, Jobs
from lrdeploy.passes.error_reach import plan_suffix
from lrdeploy.passes.inject_error import perturbable_model
from lrdeploy.calib.data import PRESENT_OUTPUT
from lrdeploy.passes.drop_blocks import TransformerBlock
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.moment_graph import inferred_types
from lrdeploy.runtime.onnxruntime import create_session
from lrdeploy.stages.distortion import DistortionProbe
from lrdeploy.stages.error_runs import ErrorGroup, LayerError, measure_error_groups, single_layer_groups
from lrdeploy.stages.samples import is_causal_lm

AT_END = "at block end"  # the key of a variant's distortion at its block's end


@dataclass(frozen=True)
class BlockEnd:
    """A block as its measurement at its end sees it (`planning.blocks.block_ends`)."""

    end: str  # the residual stream where the block ends
    attention: tuple[str, ...]  # its attention's layers (by name)
    ffn: tuple[str, ...]  # its FFN's layers
    start: str | None = None  # the stream it starts from, where the block can be dropped


def sides(blocks: list[BlockEnd | None]) -> dict[str, tuple[int, str]]:
    """Each layer of a block whose end is known: (block index, "attention" | "ffn")."""
    found = {}
    for index, block in enumerate(blocks):
        if block is not None:
            found.update((name, (index, "attention")) for name in block.attention)
            found.update((name, (index, "ffn")) for name in block.ffn)
    return found


def measure_at_block_ends(
    model: onnx.ModelProto, blocks: list[BlockEnd | None], variants: list[tuple[LinearLayer, list[LayerError]]],
    batches: Iterable[dict[str, np.ndarray]], threads: int = 0,
    steps: Callable[[int], Callable[[], None]] | None = None, mask_name: str | None = None, jobs: Jobs = SERIAL,
    drops: list[tuple[Hashable, int]] = (),
) -> dict[Hashable, float]:
    """The outputs' distortion of each variant (scaled from its block's end where it can be) and of each block
    dropped (`drops`: key, index into `blocks`, one with a start; measured exactly). `steps(total)` makes the progress callback once
    the number of runs is known."""
    types, _ = inferred_types(model)
    side_of = sides(blocks)
    unscored = kv_cache_outputs(model)
    by_block: dict[int, list[tuple[LinearLayer, list[LayerError]]]] = {}
    elsewhere = []
    for layer, errors in variants:
        (by_block.setdefault(side_of[layer.name][0], []) if layer.name in side_of and errors else elsewhere).append(
            (layer, errors))

    groups: list[ErrorGroup] = []
    calibrations: dict[Hashable, int] = {}  # calibration key → its block
    gains: dict[Hashable, Hashable] = {}  # a variant's key → its side's calibration key
    for index, block_variants in sorted(by_block.items()):
        layers = [layer for layer, _ in block_variants]
        horizon = blocks[index].end
        if plan_suffix(model, layers, types, horizon, unscored) is None:
            elsewhere += block_variants
            continue
        local = [((AT_END, key), {place: make}) for place, (_, errors) in enumerate(block_variants)
                 for key, make in errors]
        for side in ("attention", "ffn"):
            members = [place for place, layer in enumerate(layers) if side_of[layer.name][1] == side]
            if not members:
                continue
            key = ("block gain", index, side)
            calibrations[key] = index
            local.append(((AT_END, key), {place: block_variants[place][1][(len(block_variants[place][1]) - 1) // 2][1]
                                          for place in members}))
            gains.update((variant_key, key) for place in members for variant_key, _ in block_variants[place][1])
        groups.append(ErrorGroup(layers, local, horizon, frozenset((AT_END, key) for key in calibrations)))
    groups += single_layer_groups(elsewhere)

    on_step = steps(sum(len(group.variants) for group in groups) + len(calibrations) + len(drops)) \
        if steps is not None else None
    ends = [block.end for block in blocks if block is not None]
    starts = [blocks[index].start for _, index in drops]
    measured, changes, probe = measure_error_groups(model, groups, batches, threads, on_step, mask_name, jobs, types,
                                                    keep=[*ends, *starts], unscored=unscored)
    block_changes = {key: (blocks[calibrations[key]].end, changes[(AT_END, key)]) for key in calibrations}
    block_changes.update({key: (blocks[index].end, [values[blocks[index].start] - values[blocks[index].end]
                                                    for values in probe.kept]) for key, index in drops})
    losses = {key: value for key, value in measured.items() if not (isinstance(key, tuple) and key[:1] == (AT_END,))}
    losses.update(changed_at_block_ends(model, ends, block_changes, probe, types, threads, on_step))
    for key, calibration in gains.items():
        at_end = measured[(AT_END, calibration)]
        losses[key] = measured[(AT_END, key)] * (losses[calibration] / at_end if at_end > 0 else 0.0)
    return {key: loss for key, loss in losses.items() if key not in calibrations}


def changed_at_block_ends(model: onnx.ModelProto, ends: list[str],
                          block_changes: dict[Hashable, tuple[str, list[np.ndarray]]], probe: DistortionProbe, types: dict[str, onnx.TypeProto], threads: int,
                          on_step: Callable[[], None] | None = None) -> dict[Hashable, float]:
    """The outputs' distortion of each change (key → a tensor of `ends`, its change per probe batch) added to
    that tensor, the other ends unchanged: one session of the whole model serves them all. A block dropped is
    the change its input minus its output at its end (exact, whatever the block's norms)."""
    if not block_changes:
        return {}
    perturbable, inputs = perturbable_model(model, ends, types)
    session = create_session(perturbable, threads)
    change_input = dict(zip(ends, inputs))
    zeros = [{name: np.zeros_like(values[end]) for name, end in zip(inputs, ends)} for values in probe.kept]
    losses = {}
    for key, (end, change) in block_changes.items():
        fed = change_input[end]
        outputs = [session.run(probe.names, {**batch, **zero, fed: delta.astype(zero[fed].dtype)})
                   for batch, zero, delta in zip(probe.batches, zeros, change)]
        losses[key] = probe.of_outputs(outputs)
        if on_step is not None:
            on_step()
    return losses


def dropped_block_losses(model: onnx.ModelProto, blocks: list[TransformerBlock],
                         batches: Iterable[dict[str, np.ndarray]], threads: int = 0, mask_name: str | None = None) -> dict[str, float]:
    """The outputs' distortion of each block dropped alone (by name), through one session (`--drop-blocks`)."""
    types, _ = inferred_types(model)
    ends = [block.output_name for block in blocks]
    probe = DistortionProbe(model, batches, threads, mask_name,
                            keep=list(dict.fromkeys([*ends, *(block.input_name for block in blocks)])), types=types)
    changes = {block.name: (block.output_name, [kept[block.input_name] - kept[block.output_name]
                                                for kept in probe.kept]) for block in blocks}
    return changed_at_block_ends(model, ends, changes, probe, types, threads)


def kv_cache_outputs(model: onnx.ModelProto) -> set[str]:
    """A causal LM's KV-cache outputs (`present.N.*`): scored by nothing (its logits are what the distortion reads),
    so a layer's error may reach them around its block's end."""
    if not is_causal_lm(model):
        return set()
    return {value.name for value in model.graph.output if PRESENT_OUTPUT.match(value.name)}
