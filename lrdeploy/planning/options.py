"""What the unified plan chooses from, and what each choice costs. One plan over every shape (`--plan unified`, and `--target-latency` for any plan): per transformer block,
dense, low-rank at a rank per layer, a narrower FFN, fewer heads, or the block dropped, chosen by a knapsack
(`lowrank.knapsack`) for the least measured output distortion under a latency target or the parameter budget.

    model = AllOf(block…, loose layer…)
    block = OneOf(drop, AllOf(attention, ffn, other layers of the block))
    attention = OneOf(h heads kept…, AllOf(rank of Q, K, V, O))      ffn = OneOf(k neurons kept…, AllOf(rank of up, down))
    layer = OneOf(dense, rank k…)

Each option carries:
- an accuracy cost: output distortion (1 − cosine, as `--allocation sensitivity` measures it) with that option
  alone, on the probe batches: low-rank from the sensitivity table (interpolated along the spectrum), structured
  cuts by running the cut model;
- a latency saving at `--tokens` rows (milliseconds): dense against split GEMMs from `latency.Timer` (measured
  here on ONNX Runtime, or read from a device profile). Measured here, a structured option's saving is the whole
  model's: the model with that option in every block, timed side by side with the dense model, over the number
  of blocks (so softmax, GELU and LayerNorm time count). From a profile, it is the GEMMs' saving only, and the
  prediction covers the linear layers;
- a parameter saving.
Costs are summed over options (each measured alone), the assumption `--allocation sensitivity` already makes.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from lrdeploy.bench.alternate import alternated_times
from lrdeploy.bench.timer import Timer
from lrdeploy.calib.cache import StatisticsCache
from lrdeploy.calib.data import Feeds, SampleSet
from lrdeploy.errors import OptionError
from lrdeploy.jobs import SERIAL, Jobs
from lrdeploy.lowrank.decompose import Decomposition, planned_factors
from lrdeploy.lowrank.moments import Moments
from lrdeploy.lowrank.neurons import NeuronCut, group_cuts, neuron_cuts
from lrdeploy.passes.compose import StructuredCuts, compressed_model
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.planning.blocks import BlockParts, block_ends, constrain_parts
from lrdeploy.planning.cuts import kept_count
from lrdeploy.planning.timing import build_timer
from lrdeploy.progress import Progress
from lrdeploy.runtime.onnxruntime import create_session
from lrdeploy.settings.build import BuildConfig
from lrdeploy.stages.distortion import DistortionProbe
from lrdeploy.stages.block_reach import measure_at_block_ends
from lrdeploy.stages.error_runs import measure_layer_errors
from lrdeploy.stages.sensitivity import reaches_block_ends

FFN_LEVELS = (0.75, 0.5, 0.375, 0.25)  # fractions of an FFN's neurons an option keeps
HEAD_LEVELS = (0.75, 0.5, 0.25)  # fractions of a self-attention's heads an option keeps
LATENCY_RANKS = 8  # ranks per layer shape a latency plan times (spread below break-even)
PLAN_ITERATIONS = 10  # alternated runs per model when timing the plan's variants (their fastest is the cost)


@dataclass
class CutOption:
    """One structured option of one block, measured alone."""

    kind: str  # "ffn" | "heads" | "drop"
    block: int
    kept: int  # neurons or heads kept; 0 for a dropped block
    cut: StructuredCuts
    params_saved: int
    loss: float = 0.0
    ms_saved: float = 0.0

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.block}"


@dataclass
class ShapeOptions:
    """What a unified plan chooses from, measured once per model and data (a sweep plans many budgets on it)."""

    parts: list[BlockParts]
    cuts: list[CutOption]
    structured: bool  # False: only low-rank options (`--plan lowrank --target-latency`)
    target_latency: float | None = None  # the latency target planned for; None: the parameter budget
    timer: Timer | None = None  # where the latency plan's timings come from (with a target)
    dense_ms: float = 0.0  # the time the latency target is a fraction of
    gemm_scale: float = 1.0  # in-model over lone-GEMM time of the low-rank savings (measured here; 1 from a profile)
    scope: str = ""  # "whole model" (measured here) or "linear layers" (from a profile)
    fixed: StructuredCuts = field(default_factory=StructuredCuts)  # decided before the plan (a constrained plan)
    fixed_params: tuple[int, int] = (0, 0)  # the fixed cuts' layers: weight parameters before, after


def cut_options(parts: list[BlockParts], moments: dict[str, Moments], multiple: int) -> list[CutOption]:
    """Every structured option of every block (distinct kept counts only), not yet measured."""
    options = []
    for index, part in enumerate(parts):
        if part.ffn is not None:
            ffn, moment = part.ffn, moments[part.ffn.down.input_name]
            widths = {kept_count(ffn.width, f, multiple) for f in FFN_LEVELS} - {ffn.width}
            by_width = neuron_cuts(moment, ffn.down.weight, ffn.down.bias, list(widths))
            for kept, cut in sorted(by_width.items(), reverse=True):
                saved = (ffn.width - kept) * ffn.params_per_neuron
                options.append(CutOption("ffn", index, kept, StructuredCuts(ffn=[(ffn, cut)]), saved))
        if part.attention is not None and not part.attention.feeds_cache:  # a KV cache keeps its head count
            attention, moment = part.attention, moments[part.attention.output.input_name]
            counts = {kept_count(attention.units, f, 1) for f in HEAD_LEVELS} - {attention.units}
            by_count = group_cuts(moment, attention.output.weight, attention.output.bias, attention.units, list(counts))
            for kept, (heads, cut) in sorted(by_count.items(), reverse=True):
                saved = (attention.units - kept) * attention.params_per_unit
                options.append(CutOption("heads", index, kept, StructuredCuts(heads=[(attention, heads, cut)]), saved))
        if part.block is not None:
            weighted = part.block.weighted_layers(part.layers)
            options.append(CutOption("drop", index, 0, StructuredCuts(dropped=[(part.block, weighted, 0.0)]),
                                     sum(layer.params for layer in weighted)))
    return options


def refit_layer(option: CutOption) -> tuple[LinearLayer, NeuronCut]:
    """The projection an FFN or head option refits (down, or the attention's output) and its cut."""
    if option.kind == "ffn":
        block, cut = option.cut.ffn[0]
        return block.down, cut
    attention, _, cut = option.cut.heads[0]
    return attention.output, cut


def cut_error(layer: LinearLayer, cut: NeuronCut):
    """The cut as an error on the refit layer: its kept input rows carry the refit weight, the others nothing."""
    def make() -> tuple[np.ndarray, np.ndarray]:
        weight = np.zeros((layer.d_in, layer.d_out))
        weight[cut.keep] = cut.weight
        bias = np.zeros(layer.d_out) if layer.bias is None else np.asarray(layer.bias, np.float64)
        return weight - np.asarray(layer.weight, np.float64), np.asarray(cut.bias, np.float64) - bias
    return make


def measure_cut_losses(model: onnx.ModelProto, options: list[CutOption], probe: SampleSet, feeds: Feeds,
                       config: BuildConfig, cache: StatisticsCache, progress: Progress, jobs: Jobs = SERIAL,
                       parts: list[BlockParts] = ()) -> None:
    """Each option's output distortion alone on the probe batches (cached like the sensitivity table). An FFN or
    head cut changes its block's output only through the projection it refits (the dropped neurons or heads feed
    nothing else), so it is measured as that layer's weight error in the sensitivity graph, one session for many
    options; a dropped block is measured as a whole variant model — or, at block ends (`stages.block_reach`,
    `parts`: the blocks the options index), the cuts are scaled from their block's end and a drop is its block's
    input fed as its output."""
    ends = block_ends(parts)
    at_block_ends = reaches_block_ends(config, model) and any(end is not None for end in ends)

    def measure() -> dict[str, dict[int, float]]:
        by_layer: dict[str, tuple[LinearLayer, list]] = {}
        for option in options:
            if option.kind != "drop":
                layer, cut = refit_layer(option)
                by_layer.setdefault(layer.name, (layer, []))[1].append(((option.key, option.kept),
                                                                       cut_error(layer, cut)))
        drops = [option for option in options if option.kind == "drop"]
        if at_block_ends:
            measured = measure_at_block_ends(model, ends, list(by_layer.values()), feeds.batches(probe),
                                             config.threads, lambda total: progress.steps("measuring structured cuts",
                                                                                          total),
                                             feeds.mask_name, jobs, [((o.key, o.kept), o.block) for o in drops])
        else:
            on_step = progress.steps("measuring structured cuts", len(options))
            measured = measure_layer_errors(model, list(by_layer.values()), feeds.batches(probe), config.threads,
                                            on_step, mask_name=feeds.mask_name, jobs=jobs)
            if drops:
                distortion = DistortionProbe(model, feeds.batches(probe), config.threads, feeds.mask_name)
                losses = jobs.map(drop_distortion, drops, (model, distortion, jobs.threads(config.threads)),
                                  lambda _: on_step())
                measured.update({(option.key, option.kept): loss for option, loss in zip(drops, losses)})
        table: dict[str, dict[int, float]] = {}
        for (key, kept), loss in measured.items():
            table.setdefault(key, {})[kept] = loss
        return table

    settings = (f"{feeds.mask_name}|{config.factorization.rank_multiple}|{FFN_LEVELS}|{HEAD_LEVELS}|structured-v2"
                + ("|at-block-ends" if at_block_ends else ""))
    table = cache.sensitivity(probe, settings, {option.key for option in options}, measure)
    for option in options:
        option.loss = table[option.key][option.kept]
        option.cut.dropped = [(block, layers, option.loss) for block, layers, _ in option.cut.dropped]  # for the report


def drop_distortion(option: CutOption, shared: tuple[onnx.ModelProto, DistortionProbe, int]) -> float:
    """The distortion of the model with `option`'s block dropped (a job of `measure_cut_losses`)."""
    model, distortion, threads = shared
    return distortion.of_session(create_session(option.cut.applied_to(model), threads))


def _linear_ms(timer: Timer, d_in: int, d_out: int) -> float | None:
    """A dense layer's time from the timer (None where its profile lacks the shape)."""
    timer.ensure({(d_in, d_out): set()})
    timing = timer.timings.get((d_in, d_out))
    return None if timing is None else timing.dense_ms


def gemm_saving_ms(option: CutOption, parts: list[BlockParts], timer: Timer) -> float:
    """What an option saves in its GEMMs alone (dense layers at the old against the new widths); 0 where a
    shape is not known (an unknown GEMM never counts as free)."""
    part = parts[option.block]
    if option.kind == "drop":
        before = [(layer.d_in, layer.d_out) for layer in part.layers if layer.weight is not None]
        after = []
    elif option.kind == "ffn":
        widening, down = part.ffn.widening, part.ffn.down
        before = [(layer.d_in, layer.d_out) for layer in part.ffn.layers]
        after = [(layer.d_in, option.kept) for layer in widening] + [(option.kept, down.d_out)]
    else:
        attention = part.attention
        width = option.kept * attention.group_size * attention.head_dim
        before = [(layer.d_in, layer.d_out) for layer in (*attention.projections, attention.output)]
        after = [(attention.d_in, kept) for kept in attention.projection_widths(width)] + [(width, attention.output.d_out)]
    times = [[_linear_ms(timer, *shape) for shape in shapes] for shapes in (before, after)]
    if any(ms is None for ms in times[0] + times[1]):
        return 0.0
    return sum(times[0]) - sum(times[1])


def time_variants(model: onnx.ModelProto, variants: dict[str, onnx.ModelProto], config: BuildConfig,
                  progress: Progress) -> dict[str, float]:
    """Fastest milliseconds of the dense model ("dense") and of each variant (`alternated_times`). The minimum,
    not the median: these are costs to plan with, and on a shared machine a burst of other work during part of
    the alternation inflated some models' medians (a plan keeping 75% of heads and FFN was once predicted at
    ×0.54). PLAN_ITERATIONS runs each, not the bench's 20: this takes ~2 minutes for MiniLM's
    ten variants at 32×128 on 2 cores, and the plan is held to the clock afterwards (`clock_check`)."""
    times = timed_against_dense(model, variants, config, progress, PLAN_ITERATIONS)
    return {name: float(np.min(values)) for name, values in times.items()}


def cut_variants(model: onnx.ModelProto, options: list[CutOption]) -> dict[str, onnx.ModelProto]:
    """Per (kind, kept): the model with that option in every block that has it; a drop in the middle block alone
    (every block dropped would leave no model)."""
    groups: dict[str, list[CutOption]] = {}
    for option in options:
        groups.setdefault(f"{option.kind}:{option.kept}", []).append(option)
    return {name: _merged([group[len(group) // 2].cut] if name.startswith("drop") else [o.cut for o in group])
            .applied_to(model) for name, group in groups.items()}


def _merged(cuts: list[StructuredCuts]) -> StructuredCuts:
    merged = StructuredCuts()
    for cut in cuts:
        merged.merge(cut)
    return merged


def measure_savings(options: ShapeOptions, model: onnx.ModelProto, eligible: list[LinearLayer],
                    decompositions: dict[str, Decomposition], config: BuildConfig, progress: Progress) -> None:
    """Measured here: the whole model's time, each cut's per-block saving from its variant, and the scale from
    lone-GEMM timings to in-model ones (a variant with every layer split at its middle candidate rank against
    what the lone GEMMs predict for it: ONNX Runtime runs a layer inside the model faster than alone)."""
    variants = cut_variants(model, options.cuts)
    middle = {layer.name: ranks[len(ranks) // 2] for layer in eligible
              if (ranks := rank_grid(layer, config.factorization.rank_multiple, LATENCY_RANKS))}
    if middle:
        variants["lowrank"] = compressed_model(model, eligible, planned_factors(decompositions, middle))
    fastest = time_variants(model, variants, config, progress)
    options.dense_ms = fastest["dense"]
    for option in options.cuts:
        blocks = 1 if option.kind == "drop" else sum(o.kind == option.kind and o.kept == option.kept
                                                     for o in options.cuts)
        option.ms_saved = (fastest["dense"] - fastest[f"{option.kind}:{option.kept}"]) / blocks
    if middle:
        options.timer.ensure({(layer.d_in, layer.d_out): {middle[layer.name]} for layer in eligible
                              if layer.name in middle})
        alone = sum(_split_saving_ms(options.timer, layer, middle[layer.name]) for layer in eligible
                    if layer.name in middle)
        in_model = fastest["dense"] - fastest["lowrank"]
        options.gemm_scale = in_model / alone if alone > 0 and in_model > 0 else 1.0


def _split_saving_ms(timer: Timer, layer: LinearLayer, rank: int) -> float:
    timing = timer.timings.get((layer.d_in, layer.d_out))
    if timing is None or rank not in timing.split_ms:
        return 0.0
    return timing.dense_ms - timing.split_ms[rank]


def shape_options(config: BuildConfig, model: onnx.ModelProto, parts: list[BlockParts],
                  moments: dict[str, Moments] | None, eligible: list[LinearLayer],
                  decompositions: dict[str, Decomposition], probe: SampleSet, feeds: Feeds, cache: StatisticsCache,
                  progress: Progress, fixed: StructuredCuts | None = None,
                  model_layers: list[LinearLayer] = (), jobs: Jobs = SERIAL) -> ShapeOptions:
    """Measure what the plan chooses from: the cuts' distortions and, for a latency target, every saving. `fixed`:
    cuts decided before the plan (--ffn-keep, ...), which its blocks no longer offer and its budget counts
    (`model_layers`: every linear layer of the model, to count them)."""
    structured = config.planning.plan == "unified"
    fixed = fixed or StructuredCuts()
    parts = constrain_parts(parts, fixed)
    cuts = cut_options(parts, moments, config.factorization.rank_multiple) if structured else []
    if cuts:
        measure_cut_losses(model, cuts, probe, feeds, config, cache, progress, jobs, parts)
    options = ShapeOptions(parts, cuts, structured, fixed=fixed, fixed_params=fixed.params(model_layers),
                           target_latency=config.planning.target_latency)
    if options.target_latency is None:
        return options
    options.timer = build_timer(config)
    if options.timer.profile is None:
        options.scope = "whole model"
        measure_savings(options, model, eligible, decompositions, config, progress)
    else:
        options.scope = "linear layers"
        layers = {layer.name: layer for layer in [*eligible, *(layer for part in parts for layer in part.layers)]}
        weighted = [layer for layer in layers.values() if layer.weight is not None]
        times = {(layer.d_in, layer.d_out): _linear_ms(options.timer, layer.d_in, layer.d_out) for layer in weighted}
        missing = sorted(shape for shape, ms in times.items() if ms is None)
        if missing:
            shapes = ", ".join(f"{d_in}×{d_out}" for d_in, d_out in missing[:6]) + (", …" if len(missing) > 6 else "")
            message = (f"profile {options.timer.profile.label} has no timing for {len(missing)} of this model's "
                       f"{len(times)} layer shapes ({shapes})")
            if len(missing) == len(times):
                raise OptionError(f"{message}; measure them on your device with `lrdeploy profile {config.model} "
                                  "--backend ort-cuda -o my-gpu.json` and pass --profile my-gpu.json")
            progress.warn(f"{message}: those layers count as saving nothing")
        options.dense_ms = sum(times[(layer.d_in, layer.d_out)] or 0.0 for layer in weighted)
        for option in cuts:
            option.ms_saved = gemm_saving_ms(option, parts, options.timer)
    return options


def rank_grid(layer: LinearLayer, multiple: int, limit: int | None) -> list[int]:
    """Ranks (multiples of `multiple`) that save parameters; at most `limit`, spread evenly."""
    ranks = layer.shape.saving_ranks(multiple)
    if limit is None or len(ranks) <= limit:
        return ranks
    return sorted({ranks[int(round(i))] for i in np.linspace(0, len(ranks) - 1, limit)})


def timed_against_dense(model: onnx.ModelProto, variants: dict[str, onnx.ModelProto], config: BuildConfig,
                        progress: Progress, iterations: int, tokens: int | None = None) -> dict[str, list[float]]:
    """Milliseconds per run (`iterations` each) of the dense model ("dense") and of each variant, run alternately
    and bound (`bench.alternate`), at `tokens` rows (default `config.planning.tokens`; batch × `config.validation.bench_seq`) on
    `config.planning.backend`."""
    tokens = tokens or config.planning.tokens
    seq = min(config.validation.bench_seq, tokens)
    batch = max(1, tokens // seq)
    progress.note(f"  timing the dense model and {len(variants)} variant{'s' * (len(variants) != 1)} at {batch}×{seq} tokens")
    return alternated_times({"dense": model, **variants}, config.planning.backend.removeprefix("ort-"), config.threads, batch,
                            seq, iterations)
