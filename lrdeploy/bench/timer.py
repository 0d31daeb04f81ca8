"""The layer timings a plan needs, measured once and remembered: dense and split GEMMs per (d_in, d_out) at one
token count, timed on ONNX Runtime here (`layer_latency.time_shapes`) or read from a device profile. The clock is
injectable, so tests can script it and check a plan's decisions exactly."""

from __future__ import annotations

from typing import Callable

from lrdeploy.bench.layer_latency import Shape, ShapeTiming, time_shapes
from lrdeploy.bench.profiles import DeviceProfile
from lrdeploy.lowrank.allocate import LayerShape, RankPlan

ShapeClock = Callable[[dict[Shape, set[int]], int, str, int], dict[Shape, ShapeTiming]]


class Timer:
    """Dense and split timings for the shapes and ranks a plan needs, measured or from a profile."""

    def __init__(self, tokens: int, device: str = "cpu", threads: int = 0, profile: DeviceProfile | None = None,
                 clock: ShapeClock | None = None):
        self.tokens, self.device, self.threads, self.profile = tokens, device, threads, profile
        self.clock = clock or time_shapes  # injected by tests: a scripted clock checks the plans' decisions exactly
        self.timings: dict[Shape, ShapeTiming] = {}

    @property
    def source(self) -> str:
        return f"profile {self.profile.label}" if self.profile else f"measured on ort-{self.device}"

    def ensure(self, needed: dict[Shape, set[int]]) -> None:
        """Time (or read from the profile) each shape's dense layer and the ranks asked for, where not yet known;
        shapes and ranks the profile lacks stay unknown."""
        missing: dict[Shape, set[int]] = {}
        for key, ranks in needed.items():
            known = self.timings[key].split_ms if key in self.timings else None
            if known is None or set(ranks) - set(known):
                missing[key] = set(ranks) - set(known or {})
        if not missing:
            return
        found = (self.profile.timings(missing, self.tokens) if self.profile
                 else self.clock(missing, self.tokens, self.device, self.threads))
        for key, timing in found.items():
            if key in self.timings:
                self.timings[key].split_ms.update(timing.split_ms)
            else:
                self.timings[key] = timing

    def speedups(self, shapes: list[LayerShape], plan: RankPlan) -> dict[str, float]:
        """Speed-up of each split in `plan` (timing what was not timed yet); splits not profiled count as 0."""
        needed: dict[Shape, set[int]] = {}
        for s in shapes:
            if plan[s.name] is not None:
                needed.setdefault((s.d_in, s.d_out), set()).add(plan[s.name])
        self.ensure(needed)
        result = {}
        for s in shapes:
            timing = self.timings.get((s.d_in, s.d_out))
            if plan[s.name] is not None:
                known = timing is not None and plan[s.name] in timing.split_ms
                result[s.name] = timing.speedup(plan[s.name]) if known else 0.0
        return result
