"""Rank allocation: which rank each layer keeps so that all eligible layers together keep at most
ρ of their weight parameters (DESIGN §4).

A plan maps layer name → rank, or None for a layer that stays dense. A layer is split only where the
rank saves parameters: k·(d_in + d_out) < d_in·d_out. Ranks are multiples of `multiple` (tensor-core
friendly) and never below one multiple.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import Callable, Literal, Mapping

import numpy as np

from lrdeploy.errors import BudgetError, OptionError

Allocation = Literal["uniform", "energy", "sensitivity"]
ALLOCATIONS: tuple[str, ...] = ("uniform", "energy", "sensitivity")
RankPlan = dict[str, "int | None"]


@dataclass(frozen=True)
class LayerShape:
    name: str
    d_in: int
    d_out: int

    @property
    def dense_params(self) -> int:
        return self.d_in * self.d_out

    def factored_params(self, rank: int) -> int:
        return rank * (self.d_in + self.d_out)

    def params(self, rank: int | None) -> int:
        return self.dense_params if rank is None else self.factored_params(rank)

    def saves(self, rank: int) -> bool:
        """True when a rank-`rank` split has fewer parameters than the dense layer (and fits its shape)."""
        return rank <= min(self.d_in, self.d_out) and self.factored_params(rank) < self.dense_params

    def saving_ranks(self, multiple: int) -> list[int]:
        """Every multiple of `multiple` whose split saves parameters, ascending."""
        return [rank for rank in range(multiple, min(self.d_in, self.d_out) + 1, multiple) if self.saves(rank)]


def realized_ratio(shapes: list[LayerShape], plan: Mapping[str, int | None]) -> float:
    """Parameters kept by `plan` over the dense parameters of the same layers (1 for no layers)."""
    dense = sum(s.dense_params for s in shapes)
    return sum(s.params(plan[s.name]) for s in shapes) / dense if dense else 1.0


def check_budget_range(budget: float) -> None:
    """A rank budget is a fraction of parameters kept: in (0, 1]."""
    if not 0.0 < budget <= 1.0:
        raise BudgetError(f"rank budget {budget} is outside (0, 1]; pass e.g. --rank-budget 0.5")


def minimum_ratio(shapes: list[LayerShape], multiple: int) -> float:
    """The fraction of parameters kept when every layer keeps the smallest rank, one `multiple`."""
    return realized_ratio(shapes, {s.name: multiple for s in shapes})


def check_budget(shapes: list[LayerShape], budget: float, multiple: int) -> None:
    """The budget is a fraction and the smallest ranks fit under it."""
    check_budget_range(budget)
    floor = minimum_ratio(shapes, multiple)
    if floor > budget:
        raise BudgetError(
            f"rank budget {budget} is below what the smallest rank ({multiple}) keeps ({floor:.3f}); "
            f"raise --rank-budget to at least {floor:.3f} or lower --rank-multiple"
        )


def _uniform_plan(shapes: list[LayerShape], fraction: float, multiple: int) -> RankPlan:
    plan: RankPlan = {}
    for s in shapes:
        target = fraction * s.dense_params / (s.d_in + s.d_out)
        rank = max(multiple, int(round(target / multiple)) * multiple)
        plan[s.name] = rank if s.saves(rank) else None
    return plan


def uniform_ranks(shapes: list[LayerShape], budget: float, multiple: int) -> RankPlan:
    """Every layer keeps the same fraction of its parameters, rounded to the nearest rank multiple.

    Rounding up, or a layer left dense because its rank would not save parameters, can push the total
    over the budget; then the per-layer fraction is lowered by bisection until the realized ratio fits.
    Whatever rounding left unspent is then handed out one multiple at a time, smallest fraction first.
    """
    check_budget(shapes, budget, multiple)
    plan = _uniform_plan(shapes, budget, multiple)
    if realized_ratio(shapes, plan) <= budget:
        return _top_up(shapes, plan, budget, multiple)
    low, high = 0.0, budget
    for _ in range(50):
        mid = (low + high) / 2
        if realized_ratio(shapes, _uniform_plan(shapes, mid, multiple)) <= budget:
            low = mid
        else:
            high = mid
    return _top_up(shapes, _uniform_plan(shapes, low, multiple), budget, multiple)


def _top_up(shapes: list[LayerShape], plan: RankPlan, budget: float, multiple: int) -> RankPlan:
    """Spend what bisection left of the budget: raise factorized layers by one multiple, those furthest
    below the budget fraction first, while the total still fits."""
    allowance = budget * sum(s.dense_params for s in shapes)
    spent = sum(s.params(plan[s.name]) for s in shapes)
    by_deficit = sorted(
        (s for s in shapes if plan[s.name] is not None),
        key=lambda s: s.params(plan[s.name]) / s.dense_params,
    )
    plan = dict(plan)
    changed = True
    while changed:
        changed = False
        for s in by_deficit:
            rank = plan[s.name] + multiple
            cost = s.factored_params(rank) - s.factored_params(plan[s.name])
            if s.saves(rank) and spent + cost <= allowance:
                plan[s.name] = rank
                spent += cost
                changed = True
    return plan


LossCurve = Callable[[LayerShape, "int | None"], float]


def greedy_ranks(shapes: list[LayerShape], loss: LossCurve, budget: float, multiple: int) -> RankPlan:
    """Global greedy knapsack: start every layer at one rank multiple, then repeatedly move the layer whose
    loss falls most per parameter spent to its best next rank (any higher multiple, or dense), while the
    budget allows. Looking past the next multiple (the lower convex hull of each loss curve) keeps a layer
    whose curve has a flat stretch from being starved; on convex curves this is the optimal allocation up
    to the last step's rounding.

    `loss(shape, rank)` is the layer's estimated damage at `rank` (None = dense, loss 0).
    """
    check_budget(shapes, budget, multiple)
    allowance = budget * sum(s.dense_params for s in shapes)
    plan: RankPlan = {s.name: multiple for s in shapes}
    spent = sum(s.factored_params(multiple) for s in shapes)

    def next_step(s: LayerShape, rank: int) -> tuple[float, int | None, int] | None:
        """(loss drop per parameter, new rank, parameter cost) of the layer's steepest move up, if any."""
        candidates: list[int | None] = list(range(rank + multiple, min(s.d_in, s.d_out) + 1, multiple))
        candidates = [k for k in candidates if s.saves(k)] + [None]
        here = loss(s, rank)
        best = None
        for new_rank in candidates:
            cost = s.params(new_rank) - s.factored_params(rank)
            if cost > 0:
                ratio = (here - loss(s, new_rank)) / cost
                if best is None or ratio > best[0]:
                    best = (ratio, new_rank, cost)
        return best

    by_name = {s.name: s for s in shapes}
    heap: list[tuple[float, str, int | None, int]] = []
    for s in shapes:
        step = next_step(s, multiple)
        if step:
            heapq.heappush(heap, (-step[0], s.name, step[1], step[2]))
    while heap:
        _, name, new_rank, cost = heapq.heappop(heap)
        if spent + cost > allowance:
            shape, rank = by_name[name], plan[name]
            smaller = [k for k in range(rank + multiple, shape.d_in + 1, multiple)
                       if k != new_rank and shape.saves(k) and spent + shape.factored_params(k) - shape.factored_params(rank) <= allowance
                       and loss(shape, k) < loss(shape, rank)]
            if smaller:  # the hull step does not fit; take the largest step up that does
                k = max(smaller)
                spent += shape.factored_params(k) - shape.factored_params(rank)
                plan[name] = k
                step = next_step(shape, k)
                if step:
                    heapq.heappush(heap, (-step[0], name, step[1], step[2]))
            continue
        plan[name] = new_rank
        spent += cost
        if new_rank is not None:
            step = next_step(by_name[name], new_rank)
            if step:
                heapq.heappush(heap, (-step[0], name, step[1], step[2]))
    return plan


def discarded_fraction(spectrum: np.ndarray, rank: int) -> float:
    """Share of a descending spectrum's total energy that truncation at `rank` discards (0 for an empty one)."""
    total = float(spectrum.sum())
    return 0.0 if total <= 0.0 else float(spectrum[rank:].sum()) / total


def energy_ranks(
    shapes: list[LayerShape], energies: Mapping[str, np.ndarray], budget: float, multiple: int
) -> RankPlan:
    """Greedy on normalized discarded eigen-energy: a layer's loss at rank k is the fraction of its spectrum
    beyond k. (A few dominant dimensions can make a layer look "rank 4" here; see sensitivity.)"""

    def discarded(shape: LayerShape, rank: int | None) -> float:
        return 0.0 if rank is None else discarded_fraction(energies[shape.name], rank)

    return greedy_ranks(shapes, discarded, budget, multiple)


def allocate(
    allocation: Allocation,
    shapes: list[LayerShape],
    budget: float,
    multiple: int,
    energies: Mapping[str, np.ndarray] | None = None,
    loss: LossCurve | None = None,
) -> RankPlan:
    """Dispatch to the allocation strategy by name (`loss` is the measured curve sensitivity needs). A budget of
    1 keeps every parameter: every layer stays dense."""
    if allocation not in ALLOCATIONS:
        raise OptionError(f"unknown allocation {allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if budget == 1.0:
        return {s.name: None for s in shapes}
    if allocation == "uniform":
        return uniform_ranks(shapes, budget, multiple)
    if allocation == "energy":
        if energies is None:
            raise OptionError("energy allocation needs a spectrum per layer; use --allocation uniform")
        return energy_ranks(shapes, energies, budget, multiple)
    if loss is None:
        raise OptionError("sensitivity allocation needs measured sensitivities; use --allocation uniform")
    return greedy_ranks(shapes, loss, budget, multiple)


def allocate_around_dense(
    allocation: Allocation,
    shapes: list[LayerShape],
    dense: set[str],
    budget: float,
    multiple: int,
    energies: Mapping[str, np.ndarray] | None = None,
    loss: LossCurve | None = None,
) -> RankPlan:
    """Allocate with the layers in `dense` held dense: the others share what the budget leaves."""
    rest = [s for s in shapes if s.name not in dense]
    plan: RankPlan = {name: None for name in dense}
    if not rest:
        return plan
    total = sum(s.dense_params for s in shapes)
    left = budget * total - sum(s.dense_params for s in shapes if s.name in dense)
    share = left / sum(s.dense_params for s in rest)
    if share <= 0 or minimum_ratio(rest, multiple) > share:
        raise BudgetError(
            f"keeping {len(dense)} layers dense where splitting does not pay leaves too little of rank budget "
            f"{budget} for the others; raise --rank-budget or build without --latency-aware"
        )
    plan.update(allocate(allocation, rest, min(share, 1.0), multiple, energies, loss))
    return plan


def rank_ceilings(shapes: list[LayerShape], multiple: int, uniform_budgets: tuple[float, ...] = ()
                  ) -> dict[str, int]:
    """The largest rank any plan can ask of each layer, so that a decomposition keeps only that many vectors:
    the largest rank that still saves parameters (a split past it is never made), or, when the plan is known to
    be uniform over `uniform_budgets`, the largest rank those budgets give the layer (a 4096² layer at half the
    parameters needs 1024 of its 4096 eigenvectors)."""
    ceilings = {s.name: max(s.saving_ranks(multiple), default=min(s.d_in, s.d_out)) for s in shapes}
    if uniform_budgets:
        plans = [uniform_ranks(shapes, budget, multiple) for budget in uniform_budgets if budget < 1.0]
        for name in ceilings:
            ceilings[name] = min(ceilings[name], max((plan[name] or multiple for plan in plans), default=multiple))
    return ceilings
