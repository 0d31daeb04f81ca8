"""One plan over every shape (`--plan unified`, and `--target-latency` for any plan): per transformer block,
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
import onnx_graphsurgeon as gs

from lrdeploy.bench.feeds import timing_feed
from lrdeploy.bench.profiles import DeviceProfile
from lrdeploy.bench.measure import BenchSettings, time_shape
from lrdeploy.calib.data import Feeds, SampleSet, model_input_specs
from lrdeploy.calib.stats import TensorRequest
from lrdeploy.errors import BudgetError
from lrdeploy.lowrank.allocate import LossCurve
from lrdeploy.lowrank.decompose import Decomposition, planned_factors
from lrdeploy.lowrank.knapsack import AllOf, Node, OneOf, Option, max_saving, solve
from lrdeploy.lowrank.moments import Moments
from lrdeploy.lowrank.neurons import group_cuts, neuron_cuts
from lrdeploy.passes.compose import compressed_model
from lrdeploy.passes.drop_blocks import TransformerBlock, find_transformer_blocks
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.passes.ort_fusion import attention_geometry
from lrdeploy.passes.prune_ffn import FfnBlock, find_ffn_blocks
from lrdeploy.passes.prune_heads import AttentionBlock, find_attention_blocks, find_fused_attention_blocks
from lrdeploy.calib.cache import StatisticsCache
from lrdeploy.settings.build import BuildConfig
from lrdeploy.planning.latency_aware import Timer
from lrdeploy.progress import Progress
from lrdeploy.stages.sensitivity import degradation
from lrdeploy.planning.cuts import StructuredCuts, kept_count
from lrdeploy.runtime.onnxruntime import OrtRunner, create_session

FFN_LEVELS = (0.75, 0.5, 0.375, 0.25)  # fractions of an FFN's neurons an option keeps
HEAD_LEVELS = (0.75, 0.5, 0.25)  # fractions of a self-attention's heads an option keeps
LATENCY_RANKS = 8  # ranks per layer shape a latency plan times (spread below break-even)
PLAN_ITERATIONS = 10  # alternated runs per model when timing the plan's variants (their fastest is the cost)


@dataclass
class BlockParts:
    """One transformer block: its self-attention and FFN (either may be missing where it does not match, e.g. a
    model of FFNs only), the block to drop, and every linear layer in it."""

    attention: AttentionBlock | None
    ffn: FfnBlock | None
    block: TransformerBlock | None
    layers: list[LinearLayer]


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
    timer: Timer | None = None
    dense_ms: float = 0.0  # the time the latency target is a fraction of
    gemm_scale: float = 1.0  # in-model over lone-GEMM time of the low-rank savings (measured here; 1 from a profile)
    scope: str = ""  # "whole model" (measured here) or "linear layers" (from a profile)


def find_block_parts(config: BuildConfig, graph: gs.Graph, layers: list[LinearLayer]) -> list[BlockParts]:
    """The blocks in model order, each with the layers between its Q projection and the next block's."""
    ffn = find_ffn_blocks(graph, layers)
    attention = find_fused_attention_blocks(graph, layers) if config.optimize == "ort" else []
    if config.optimize == "none":
        geometry = attention_geometry(graph)
        heads = config.num_heads or (geometry[0] if geometry else 0)
        attention = find_attention_blocks(layers, heads) if heads else []
    if not attention:  # no self-attention matched: the FFNs are the only blocks
        return [BlockParts(None, block, None, [block.up, block.down]) for block in ffn]
    dropped = {block.input_name: block for block in find_transformer_blocks(graph, attention, ffn)}
    order = [layer.name for layer in layers]
    starts = [order.index(block.projections[0].name) for block in attention] + [len(order)]
    parts = []
    for index, block in enumerate(attention):
        inside = layers[starts[index]:starts[index + 1]]
        names = {layer.name for layer in inside}
        block_ffn = next((f for f in ffn if f.up.name in names and f.down.name in names), None)
        parts.append(BlockParts(block, block_ffn, dropped.get(block.input_name), inside))
    return parts


def structure_requests(parts: list[BlockParts]) -> list[TensorRequest]:
    """The moments the cuts need: each FFN's activation, each attention's context."""
    return ([TensorRequest(p.ffn.down.input_name, p.ffn.width) for p in parts if p.ffn]
            + [TensorRequest(p.attention.output.input_name, p.attention.output.d_in) for p in parts if p.attention])


def cut_options(parts: list[BlockParts], moments: dict[str, Moments], multiple: int) -> list[CutOption]:
    """Every structured option of every block (distinct kept counts only), not yet measured."""
    options = []
    for index, part in enumerate(parts):
        if part.ffn is not None:
            ffn, moment = part.ffn, moments[part.ffn.down.input_name]
            widths = {kept_count(ffn.width, f, multiple) for f in FFN_LEVELS} - {ffn.width}
            by_width = neuron_cuts(moment, ffn.down.weight, ffn.down.bias, list(widths))
            for kept, cut in sorted(by_width.items(), reverse=True):
                saved = (ffn.width - kept) * (ffn.up.d_in + ffn.down.d_out)
                options.append(CutOption("ffn", index, kept, StructuredCuts(ffn=[(ffn, cut)]), saved))
        if part.attention is not None:
            attention, moment = part.attention, moments[part.attention.output.input_name]
            counts = {kept_count(attention.heads, f, 1) for f in HEAD_LEVELS} - {attention.heads}
            by_count = group_cuts(moment, attention.output.weight, attention.output.bias, attention.heads, list(counts))
            for kept, (heads, cut) in sorted(by_count.items(), reverse=True):
                saved = (attention.heads - kept) * attention.head_dim * (3 * attention.d_in + attention.output.d_out)
                options.append(CutOption("heads", index, kept, StructuredCuts(heads=[(attention, heads, cut)]), saved))
        if part.block is not None:
            weighted = [layer for layer in part.layers if layer.weight is not None]
            options.append(CutOption("drop", index, 0, StructuredCuts(dropped=[(part.block, weighted, 0.0)]),
                                     sum(layer.params for layer in weighted)))
    return options


def _variant(model: onnx.ModelProto, cuts: list[StructuredCuts]) -> onnx.ModelProto:
    graph = gs.import_onnx(model)
    for cut in cuts:
        cut.apply(graph)
    return gs.export_onnx(graph.cleanup().toposort())


def measure_cut_losses(model: onnx.ModelProto, options: list[CutOption], probe: SampleSet, feeds: Feeds,
                       config: BuildConfig, cache: StatisticsCache, progress: Progress) -> None:
    """Each option's output distortion alone on the probe batches (cached like the sensitivity table)."""
    def measure() -> dict[str, dict[int, float]]:
        batches = list(feeds.batches(probe))
        dense = create_session(model, config.threads)
        reference = [dense.run(None, feed) for feed in batches]
        on_step = progress.steps("measuring structured cuts", len(options))
        table: dict[str, dict[int, float]] = {}
        for option in options:
            session = create_session(_variant(model, [option.cut]), config.threads)
            table.setdefault(option.key, {})[option.kept] = degradation(reference, [session.run(None, f) for f in batches])
            on_step()
        return table

    settings = f"{feeds.mask_name}|{config.rank_multiple}|{FFN_LEVELS}|{HEAD_LEVELS}|structured-v1"
    table = cache.sensitivity(probe, settings, {option.key for option in options}, measure)
    for option in options:
        option.loss = table[option.key][option.kept]
        option.cut.dropped = [(block, layers, option.loss) for block, layers, _ in option.cut.dropped]  # for the report


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
        up, down = part.ffn.up, part.ffn.down
        before = [(up.d_in, up.d_out), (down.d_in, down.d_out)]
        after = [(up.d_in, option.kept), (option.kept, down.d_out)]
    else:
        attention = part.attention
        width = option.kept * attention.head_dim
        before = [(layer.d_in, layer.d_out) for layer in (*attention.projections, attention.output)]
        after = [(attention.d_in, kept) for kept in attention.projection_widths(width)] + [(width, attention.output.d_out)]
    times = [[_linear_ms(timer, *shape) for shape in shapes] for shapes in (before, after)]
    if any(ms is None for ms in times[0] + times[1]):
        return 0.0
    return sum(times[0]) - sum(times[1])


def alternated_times(model: onnx.ModelProto, variants: dict[str, onnx.ModelProto], config: BuildConfig,
                     progress: Progress, iterations: int, tokens: int | None = None) -> dict[str, list[float]]:
    """Milliseconds per run (`iterations` each) of the dense model ("dense") and of each variant, run alternately
    and bound, at `tokens` rows (default `config.tokens`; batch × `config.bench_seq`) on `config.backend`."""
    device = config.backend.removeprefix("ort-")
    runners = [OrtRunner(proto, device, config.threads, name) for name, proto in {"dense": model, **variants}.items()]
    tokens = tokens or config.tokens
    seq = min(config.bench_seq, tokens)
    batch = max(1, tokens // seq)
    progress.note(f"  timing the dense model and {len(variants)} variant{'s' * (len(variants) != 1)} at {batch}×{seq} tokens")
    for runner in runners:
        runner.activate()
    try:
        return time_shape(runners, timing_feed(model_input_specs(model), batch, seq),
                          BenchSettings(warmup=2, iterations=iterations))
    finally:
        for runner in runners:
            runner.deactivate()


def time_variants(model: onnx.ModelProto, variants: dict[str, onnx.ModelProto], config: BuildConfig,
                  progress: Progress) -> dict[str, float]:
    """Fastest milliseconds of the dense model ("dense") and of each variant (`alternated_times`). The minimum,
    not the median: these are costs to plan with, and on a shared machine a burst of other work during part of
    the alternation inflated some models' medians (a plan keeping 75% of heads and FFN was once predicted at
    ×0.54). PLAN_ITERATIONS runs each, not the bench's 20: this takes ~2 minutes for MiniLM's
    ten variants at 32×128 on 2 cores, and the plan is held to the clock afterwards (`latency_check`)."""
    times = alternated_times(model, variants, config, progress, PLAN_ITERATIONS)
    return {name: float(np.min(values)) for name, values in times.items()}


def cut_variants(model: onnx.ModelProto, options: list[CutOption]) -> dict[str, onnx.ModelProto]:
    """Per (kind, kept): the model with that option in every block that has it; a drop in the middle block alone
    (every block dropped would leave no model)."""
    groups: dict[str, list[CutOption]] = {}
    for option in options:
        groups.setdefault(f"{option.kind}:{option.kept}", []).append(option)
    return {name: _variant(model, [group[len(group) // 2].cut] if name.startswith("drop") else [o.cut for o in group])
            for name, group in groups.items()}


def measure_savings(options: ShapeOptions, model: onnx.ModelProto, eligible: list[LinearLayer],
                    decompositions: dict[str, Decomposition], config: BuildConfig, progress: Progress) -> None:
    """Measured here: the whole model's time, each cut's per-block saving from its variant, and the scale from
    lone-GEMM timings to in-model ones (a variant with every layer split at its middle candidate rank against
    what the lone GEMMs predict for it: ONNX Runtime runs a layer inside the model faster than alone)."""
    variants = cut_variants(model, options.cuts)
    middle = {layer.name: ranks[len(ranks) // 2] for layer in eligible
              if (ranks := rank_grid(layer, config.rank_multiple, LATENCY_RANKS))}
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
                  progress: Progress) -> ShapeOptions:
    """Measure what the plan chooses from: the cuts' distortions and, for a latency target, every saving."""
    structured = config.plan == "unified"
    cuts = cut_options(parts, moments, config.rank_multiple) if structured else []
    if cuts:
        measure_cut_losses(model, cuts, probe, feeds, config, cache, progress)
    options = ShapeOptions(parts, cuts, structured)
    if config.target_latency is None:
        return options
    profile = None if config.profile is None else DeviceProfile.load(config.profile)
    options.timer = Timer(config.tokens, config.backend.removeprefix("ort-"), config.threads, profile)
    if profile is None:
        options.scope = "whole model"
        measure_savings(options, model, eligible, decompositions, config, progress)
    else:
        options.scope = "linear layers"
        layers = {layer.name: layer for layer in [*eligible, *(layer for part in parts for layer in part.layers)]}
        options.dense_ms = sum(_linear_ms(options.timer, layer.d_in, layer.d_out) or 0.0
                               for layer in layers.values() if layer.weight is not None)
        for option in cuts:
            option.ms_saved = gemm_saving_ms(option, parts, options.timer)
    return options


def rank_grid(layer: LinearLayer, multiple: int, limit: int | None) -> list[int]:
    """Ranks (multiples of `multiple`) that save parameters; at most `limit`, spread evenly."""
    ranks = [k for k in range(multiple, min(layer.d_in, layer.d_out) + 1, multiple) if layer.shape.saves(k)]
    if limit is None or len(ranks) <= limit:
        return ranks
    return sorted({ranks[int(round(i))] for i in np.linspace(0, len(ranks) - 1, limit)})


@dataclass
class ShapePlan:
    """A chosen plan: ranks for the low-rank layers, the structured cuts, and what it is predicted to save."""

    ranks: dict[str, int | None]
    cuts: StructuredCuts
    loss: float
    predicted_ratio: float
    resource: str  # "latency" | "params"
    choices: list[str] = field(default_factory=list)

    def summary(self, options: ShapeOptions, config: BuildConfig) -> str:
        """One console line: the predicted ratio, where it comes from, and the cuts chosen."""
        split = sum(rank is not None for rank in self.ranks.values())
        what = ("latency at {} tokens ({}, {}): predicted ×{:.2f} of dense".format(
                    config.tokens, options.scope, options.timer.source, self.predicted_ratio)
                if self.resource == "latency" else f"linear parameters: ×{self.predicted_ratio:.3f} of dense")
        cuts = ", ".join(self.choices) or "no structured cut"
        return f"  {config.plan} plan, {what}; {split} layers split; {cuts}; predicted distortion {self.loss:.4f}"

    def to_dict(self, options: ShapeOptions, config: BuildConfig) -> dict:
        return {"plan": config.plan, "resource": self.resource, "predicted_ratio": self.predicted_ratio,
                "scope": options.scope or "linear-layer parameters", "tokens": config.tokens if options.timer else None,
                "source": options.timer.source if options.timer else None, "target_latency": config.target_latency,
                "predicted_distortion": self.loss, "choices": self.choices}


def plan_shapes(options: ShapeOptions, config: BuildConfig, eligible: list[LinearLayer], budget: float,
                loss: LossCurve, target_latency: float | None = None) -> ShapePlan:
    """The least-distortion plan reaching the latency target (`target_latency`, else the config's, if set) or
    keeping at most `budget` of the linear parameters."""
    latency = options.timer is not None
    target_latency = target_latency or config.target_latency
    timer = options.timer
    limit = LATENCY_RANKS if latency else None
    ranks = {layer.name: rank_grid(layer, config.rank_multiple, limit) for layer in eligible}
    if latency:
        timer.ensure({(layer.d_in, layer.d_out): set(ranks[layer.name]) for layer in eligible})

    def layer_node(layer: LinearLayer) -> Node:
        leaves: list[Node] = [Option(0.0, 0.0, (layer.name, None, 0.0))]
        for k in ranks[layer.name]:
            if latency:
                timing = timer.timings.get((layer.d_in, layer.d_out))
                if timing is None or k not in timing.split_ms:
                    continue
                saved = options.gemm_scale * (timing.dense_ms - timing.split_ms[k])
            else:
                saved = float(layer.params - layer.shape.factored_params(k))
            if saved > 0:
                leaves.append(Option(saved, loss(layer.shape, k), (layer.name, k, saved)))
        return OneOf(leaves)

    def cut_node(option: CutOption) -> Option:
        return Option(option.ms_saved if latency else float(option.params_saved), option.loss, option)

    by_block: dict[tuple[int, str], list[CutOption]] = {}
    for option in options.cuts:
        by_block.setdefault((option.block, option.kind), []).append(option)
    is_eligible = {layer.name for layer in eligible}
    placed: set[str] = set()
    root: list[Node] = []
    for index, part in enumerate(options.parts):
        children: list[Node] = []
        for kind, group in (("heads", _attention_layers(part)), ("ffn", _ffn_layers(part))):
            if not group:
                continue
            split = AllOf([layer_node(layer) for layer in group if layer.name in is_eligible])
            children.append(OneOf([split, *(cut_node(o) for o in by_block.get((index, kind), []) if _pays(o, latency))]))
            placed |= {layer.name for layer in group}
        others = [layer for layer in part.layers if layer.name in is_eligible and layer.name not in placed]
        children += [layer_node(layer) for layer in others]
        placed |= {layer.name for layer in others}
        drops = [cut_node(o) for o in by_block.get((index, "drop"), []) if _pays(o, latency)]
        root.append(OneOf([AllOf(children), *drops]) if drops else AllOf(children))
    root += [layer_node(layer) for layer in eligible if layer.name not in placed]
    tree = AllOf(root)

    if latency:
        total = options.dense_ms
        target = (1.0 - target_latency) * total
    else:
        total = float(sum(layer.params for layer in eligible) + sum(
            layer.params for part in options.parts for layer in part.layers if layer.name not in is_eligible))
        target = (1.0 - budget) * total
    solution = solve(tree, target)
    if solution is None:
        best = 1.0 - max_saving(tree) / total
        if latency:
            raise BudgetError(f"--target-latency {target_latency:.3g} cannot be reached at {config.tokens} tokens "
                              f"({timer.source}): the fastest plan is predicted at ×{best:.2f} of dense "
                              f"({options.scope}); raise the target" + ("" if options.structured else
                                                                         ", or pass --plan unified"))
        raise BudgetError(f"rank budget {budget} cannot be met by the plan's options (smallest ×{best:.3f}); raise it")
    distortion, choices = solution
    planned = {layer.name: None for layer in eligible}
    cuts, labels, saved = StructuredCuts(source="unified plan"), [], 0.0
    for choice in choices:
        if isinstance(choice, CutOption):
            cuts.merge(choice.cut)
            labels.append(f"block{choice.block} {choice.kind}" + (f" {choice.kept}" if choice.kind != "drop" else ""))
            saved += choice.ms_saved if latency else choice.params_saved
        else:
            name, rank, layer_saved = choice
            planned[name] = rank
            saved += layer_saved
    for name in cuts.records():
        planned[name] = None
    return ShapePlan(planned, cuts, distortion, 1.0 - saved / total, "latency" if latency else "params", labels)


def _pays(option: CutOption, latency: bool) -> bool:
    return option.ms_saved > 0 if latency else option.params_saved > 0


def _attention_layers(part: BlockParts) -> list[LinearLayer]:
    a = part.attention
    return [] if a is None else [*a.projections, a.output]


def _ffn_layers(part: BlockParts) -> list[LinearLayer]:
    return [] if part.ffn is None else [part.ffn.up, part.ffn.down]
