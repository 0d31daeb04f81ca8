"""Latency-aware ranks: keep a layer dense wherever its measured split does not beat the dense layer.

Allocate, time every (shape, rank) the plan uses on the target backend, hold the losers dense and
re-allocate the others under what the budget leaves, until every split in the plan pays.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

from lrdeploy.bench.layer_latency import Shape, ShapeTiming, time_shapes
from lrdeploy.lowrank.allocate import LayerShape, LossCurve, RankPlan, allocate_around_dense

MAX_ROUNDS = 5


@dataclass
class LatencyPlan:
    plan: RankPlan
    timings: dict[Shape, ShapeTiming]
    slower: dict[str, float] = field(default_factory=dict)  # layer held dense → speed-up its split measured

    def measured_speedup(self, shape: LayerShape, rank: int | None) -> float | None:
        timing = self.timings.get((shape.d_in, shape.d_out))
        if rank is None or timing is None or rank not in timing.split_ms:
            return None
        return timing.speedup(rank)


def latency_aware_plan(
    allocation: str, shapes: list[LayerShape], budget: float, multiple: int,
    energies: Mapping[str, np.ndarray] | None, tokens: int, device: str = "cpu", threads: int = 0,
    loss: LossCurve | None = None,
) -> LatencyPlan:
    """A plan in which every factorized layer was measured faster than dense, with the timings behind it."""
    slower: dict[str, float] = {}
    timings: dict[Shape, ShapeTiming] = {}
    plan: RankPlan = {}
    for _ in range(MAX_ROUNDS):
        plan = allocate_around_dense(allocation, shapes, set(slower), budget, multiple, energies, loss)
        needed: dict[Shape, set[int]] = {}
        for s in shapes:
            rank = plan[s.name]
            key = (s.d_in, s.d_out)
            if rank is not None and rank not in (timings[key].split_ms if key in timings else {}):
                needed.setdefault(key, set()).add(rank)
        for key, timing in time_shapes(needed, tokens, device, threads).items():
            if key in timings:
                timings[key].split_ms.update(timing.split_ms)
            else:
                timings[key] = timing
        losers = {s.name: timings[(s.d_in, s.d_out)].speedup(plan[s.name]) for s in shapes
                  if plan[s.name] is not None and timings[(s.d_in, s.d_out)].speedup(plan[s.name]) <= 1.0}
        if not losers:
            break
        slower.update(losers)
    return LatencyPlan(plan, timings, slower)
