"""The unified plan (`--plan unified`, and `--target-latency` for any plan): per transformer block, dense, low-rank
at a rank per layer, a narrower FFN, fewer heads, or the block dropped, chosen by a knapsack (`lowrank.knapsack`)
for the least measured output distortion under a latency target or the parameter budget. The options and their
costs come from `planning.options`:

    model = AllOf(block…, loose layer…)
    block = OneOf(drop, AllOf(attention, ffn, other layers of the block))
    attention = OneOf(h heads kept…, AllOf(rank of Q, K, V, O))      ffn = OneOf(k neurons kept…, AllOf(rank of up, down))
    layer = OneOf(dense, rank k…)
"""

from __future__ import annotations

from dataclasses import dataclass, field

from lrdeploy.errors import BudgetError
from lrdeploy.lowrank.allocate import LossCurve
from lrdeploy.lowrank.knapsack import AllOf, Node, OneOf, Option, max_saving, solve
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.planning.blocks import BlockParts
from lrdeploy.passes.compose import StructuredCuts
from lrdeploy.planning.options import LATENCY_RANKS, CutOption, ShapeOptions, rank_grid
from lrdeploy.report.plan_records import PlanAttempt, ShapePlanRecord
from lrdeploy.settings.build import BuildConfig


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
                    config.planning.tokens, options.scope, options.timer.source, self.predicted_ratio)
                if self.resource == "latency" else f"linear parameters: ×{self.predicted_ratio:.3f} of dense")
        cuts = ", ".join(self.choices) or "no structured cut"
        return f"  {config.planning.plan} plan, {what}; {split} layers split; {cuts}; predicted distortion {self.loss:.4f}"

    def record(self, options: ShapeOptions, config: BuildConfig, measured_ratio: float | None = None,
               attempts: list[PlanAttempt] | None = None) -> ShapePlanRecord:
        """The report's record of this plan (and of what the clock check measured of it)."""
        timer = options.timer
        return ShapePlanRecord(plan=config.planning.plan, resource=self.resource, predicted_ratio=self.predicted_ratio,
                               scope=options.scope or "linear-layer parameters",
                               tokens=config.planning.tokens if timer else None, source=timer.source if timer else None,
                               target_latency=options.target_latency, predicted_distortion=self.loss,
                               choices=self.choices, measured_ratio=measured_ratio, attempts=attempts or [])


def plan_shapes(options: ShapeOptions, config: BuildConfig, eligible: list[LinearLayer], budget: float,
                loss: LossCurve, target_latency: float | None = None) -> ShapePlan:
    """The least-distortion plan reaching the latency target (`target_latency`, else the options', if set) or
    keeping at most `budget` of the linear parameters."""
    latency = options.target_latency is not None
    target_latency = target_latency or options.target_latency
    timer = options.timer
    limit = LATENCY_RANKS if latency else None
    ranks = {layer.name: rank_grid(layer, config.factorization.rank_multiple, limit) for layer in eligible}
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
        fixed_before, fixed_after = options.fixed_params  # a constrained plan: the fixed cuts count toward the budget
        cuttable = [layer for part in options.parts for layer in (*_attention_layers(part), *_ffn_layers(part))]
        total = float(sum(layer.params for layer in eligible) + fixed_before + sum(  # as the report counts them
            layer.params for layer in cuttable if layer.name not in is_eligible))
        target = max(0.0, (1.0 - budget) * total - (fixed_before - fixed_after))
    solution = solve(tree, target)
    if solution is None:
        best = 1.0 - max_saving(tree) / total
        if latency:
            raise BudgetError(f"--target-latency {target_latency:.3g} cannot be reached at {config.planning.tokens} tokens "
                              f"({timer.source}): the fastest plan is predicted at ×{best:.2f} of dense "
                              f"({options.scope}); raise the target" + ("" if options.structured else
                                                                         ", or pass --plan unified"))
        raise BudgetError(f"rank budget {budget} cannot be met by the plan's options (smallest ×{best:.3f}); raise it")
    distortion, choices = solution
    planned = {layer.name: None for layer in eligible}
    cuts, labels, saved = StructuredCuts(), [], 0.0
    for choice in choices:
        if isinstance(choice, CutOption):
            cuts.merge(choice.cut)
            labels.append(f"block{choice.block} {choice.kind}" + (f" {choice.kept}" if choice.kind != "drop" else ""))
            saved += choice.ms_saved if latency else choice.params_saved
        else:
            name, rank, layer_saved = choice
            planned[name] = rank
            saved += layer_saved
    if not latency:
        saved += options.fixed_params[0] - options.fixed_params[1]
    cuts.source = "unified plan"
    cuts.merge(options.fixed)  # their own source: the option that fixed them
    for name in cuts.records():
        planned[name] = None
    return ShapePlan(planned, cuts, distortion, 1.0 - saved / total, "latency" if latency else "params", labels)


def _pays(option: CutOption, latency: bool) -> bool:
    return option.ms_saved > 0 if latency else option.params_saved > 0


def _attention_layers(part: BlockParts) -> list[LinearLayer]:
    a = part.attention
    return [] if a is None else [*a.projections, a.output]


def _ffn_layers(part: BlockParts) -> list[LinearLayer]:
    return [] if part.ffn is None else part.ffn.layers
