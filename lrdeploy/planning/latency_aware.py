"""Latency-aware ranks: split a layer only where the split is faster than the dense layer at the target's token
count, from timings measured here (`bench.layer_latency`, ONNX Runtime) or read from a device profile
(`bench.profiles`, e.g. the H200 in FP16: plans for a GPU made on any machine).

Allocate, time every (shape, rank) the plan uses, then, where splits lose:
- no objective (default): hold the losers dense and re-allocate the others under what the budget leaves, until
  every split in the plan pays; when the budget cannot be met that way, say so in one line and let the user
  choose an objective;
- `size`: keep the budget (and the slower splits), and report the predicted slowdown;
- `latency`: the budget is a ceiling: the losers stay dense, the others keep their ranks, and the model keeps
  more parameters than the budget (possibly all of them: then nothing is split, and the plan says why).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from lrdeploy.bench.layer_latency import Shape, ShapeTiming
from lrdeploy.bench.timer import Timer
from lrdeploy.planning.timing import build_timer
from lrdeploy.report.plan_records import LatencyAwareRecord
from lrdeploy.errors import BudgetError
from lrdeploy.lowrank.allocate import LayerShape, LossCurve, RankPlan, allocate, allocate_around_dense, realized_ratio
from lrdeploy.settings.build import BuildConfig
from lrdeploy.progress import Progress

MAX_ROUNDS = 5


@dataclass
class LatencyPlan:
    plan: RankPlan
    timings: dict[Shape, ShapeTiming]
    slower: dict[str, float] = field(default_factory=dict)  # layer whose split loses → its speed-up (< 1)
    source: str = ""  # where the timings come from: "measured on ort-cpu" or a profile's label
    tokens: int = 0
    objective: str | None = None
    note: str = ""  # what the plan had to give up, for the console and the report

    def measured_speedup(self, shape: LayerShape, rank: int | None) -> float | None:
        timing = self.timings.get((shape.d_in, shape.d_out))
        if rank is None or timing is None or rank not in timing.split_ms:
            return None
        return timing.speedup(rank)

    def predicted_ratio(self, shapes: list[LayerShape]) -> float | None:
        """The linear layers' time under the plan over their dense time (None if a shape was not timed)."""
        if any((s.d_in, s.d_out) not in self.timings for s in shapes):
            return None
        dense = sum(self.timings[(s.d_in, s.d_out)].dense_ms for s in shapes)
        planned = sum(self.timings[(s.d_in, s.d_out)].dense_ms / (self.measured_speedup(s, self.plan[s.name]) or 1.0)
                      for s in shapes)
        return planned / dense

    def record(self, shapes: list[LayerShape]) -> LatencyAwareRecord:
        """The report's record of this plan."""
        return LatencyAwareRecord(source=self.source, tokens=self.tokens, objective=self.objective,
                                  predicted_linear_ratio=self.predicted_ratio(shapes), note=self.note,
                                  kept_dense=sorted(self.slower) if self.objective != "size" else [])


def _losers(speedups: dict[str, float]) -> dict[str, float]:
    return {name: speedup for name, speedup in speedups.items() if speedup <= 1.0}


def latency_aware_plan(
    allocation: str, shapes: list[LayerShape], budget: float, multiple: int,
    energies: Mapping[str, np.ndarray] | None, timer: Timer, loss: LossCurve | None = None,
    objective: str | None = None,
) -> LatencyPlan:
    """A plan whose splits pay at `timer.tokens` (or, with objective `size`, the budget's plan and its cost)."""
    plan = allocate(allocation, shapes, budget, multiple, energies, loss)
    losers = _losers(timer.speedups(shapes, plan))
    result = LatencyPlan(plan, timer.timings, losers, timer.source, timer.tokens, objective)
    where = f"at {timer.tokens} tokens ({timer.source})"
    if not losers:
        return result
    if objective == "size":
        ratio = result.predicted_ratio(shapes)
        result.note = (f"{len(losers)} of {sum(r is not None for r in plan.values())} splits are slower than dense {where}; "
                       f"kept for the budget: the linear layers are predicted at ×{ratio:.2f} of dense time"
                       if ratio is not None else f"{len(losers)} splits are slower than dense {where}; kept for the budget")
        return result
    if objective == "latency":
        result.plan = {name: None if name in losers else rank for name, rank in plan.items()}
        split = sum(rank is not None for rank in result.plan.values())
        result.note = (f"no split is faster than dense {where}: nothing is split (best ×{max(losers.values()):.2f})"
                       if split == 0 else f"{len(losers)} layers stay dense {where}, where their split is slower; "
                       f"{split} split")
        return result
    slower = dict(losers)

    def unmeetable() -> BudgetError:
        return BudgetError(
            f"rank budget {budget} cannot be met by splits that pay {where}: {len(slower)} of {len(shapes)} layers "
            "split slower than dense; pass --objective size to keep the budget anyway (slower), or --objective "
            "latency to keep those layers dense (larger)")

    for _ in range(MAX_ROUNDS):
        try:
            plan = allocate_around_dense(allocation, shapes, set(slower), budget, multiple, energies, loss)
        except BudgetError:
            raise unmeetable() from None
        if realized_ratio(shapes, plan) > budget:  # every layer held dense: nothing left to split
            raise unmeetable()
        losers = _losers(timer.speedups(shapes, plan))
        if not losers:
            break
        slower.update(losers)
    return LatencyPlan(plan, timer.timings, slower, timer.source, timer.tokens, objective)


def plan_for_latency(config: BuildConfig, shapes: list[LayerShape], budget: float,
                     energies: Mapping[str, np.ndarray] | None, loss: LossCurve | None, progress: Progress) -> LatencyPlan:
    """The build's latency-aware plan: timed here on `config.planning.backend`, or read from `config.planning.profile`; the predicted
    linear-layer latency and what the plan gave up are told to `progress`."""
    timer = build_timer(config)
    plan = latency_aware_plan(config.factorization.allocation, shapes, budget, config.factorization.rank_multiple, energies, timer, loss,
                              config.planning.objective)
    ratio = plan.predicted_ratio(shapes)
    progress.note(f"  latency at {config.planning.tokens} tokens ({plan.source}): linear layers predicted at "
                  + ("?" if ratio is None else f"×{ratio:.2f}") + " of dense time" + (f"; {plan.note}" if plan.note else ""))
    return plan
