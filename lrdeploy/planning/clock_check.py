"""Hold a latency plan to the clock (`--target-latency` measured here, not from a device profile).

A plan's prediction sums savings measured one option at a time, and options do not add up exactly: inside ORT's
fused MiniLM graph a plan predicted at ×0.58 of dense measured ×0.636; on the plain graph plans predicted at ×0.55
and ×0.57 measured ×0.547 and ×0.648. So each plan is built and timed side by side with the dense model as
`lrdeploy bench` times it (median of alternated runs at --tokens rows), and planned again for a target corrected by
what the clock said:

    t = target ─plan─► predicted p ─build, time─► measured m ── target − TOLERANCE·target ≤ m ≤ target ──► done
         ▲                                             │ otherwise (at most MAX_PLANS plans)
         └──────────── target × p / m ◄────────────────┘   (the clock's bias m / p, taken out of the target)

A plan measured far under the target is planned again too: it gives away accuracy the target allows. The plan
kept is the least distorting of those measured at or under the target; if none is, the fastest measured, with a
warning. With `--check-tokens` (e.g. 128: batch 1 too) m is the worst ratio over --tokens and those counts: costs
are planned at --tokens, and a plan for a large batch can miss at batch 1 (MiniLM: ×0.54 at 32×128, ×0.58–0.61 at
1×128). Plans from a device profile are not checked: this machine is not that device. On a shared machine the
clock itself swings (MiniLM at 32×128: ±4% between checks; at 1×128 a model measured 0.51–0.61 across sessions),
so the check bounds the bias of a prediction, not the noise of a later bench.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx

from lrdeploy.errors import BudgetError
from lrdeploy.lowrank.allocate import LossCurve
from lrdeploy.lowrank.decompose import Decomposition, planned_factors
from lrdeploy.passes.compose import compressed_model
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.planning.options import ShapeOptions, timed_against_dense
from lrdeploy.report.plan_records import PlanAttempt, ShapePlanRecord
from lrdeploy.planning.unified import ShapePlan, plan_shapes
from lrdeploy.progress import Progress
from lrdeploy.settings.build import BuildConfig

PlanClock = Callable[[ShapePlan], dict[int, float]]  # a plan → its measured time over dense's, by token count

MAX_PLANS = 3
TOLERANCE = 0.03  # relative: a plan measured within 3% under the target is kept as it is
MAX_CHECK_ITERATIONS = 200  # small token counts get more runs (as many as to time ~the --tokens work), up to this


@dataclass
class CheckedPlan:
    """The plan kept, its measured ratio (None when not measured), and every plan tried on the way."""

    plan: ShapePlan
    measured_ratio: float | None = None
    attempts: list[PlanAttempt] = field(default_factory=list)

    def record(self, options: ShapeOptions, config: BuildConfig) -> ShapePlanRecord:
        """The report's record of the plan kept, with what the clock measured."""
        return self.plan.record(options, config, self.measured_ratio, self.attempts)


def measured_ratios(dense: onnx.ModelProto, planned: onnx.ModelProto, config: BuildConfig,
                    progress: Progress) -> dict[int, float]:
    """Median time of `planned` over the dense model's, timed alternately, at `config.planning.tokens` rows and at each
    of `config.planning.check_tokens`."""
    ratios = {}
    for tokens in dict.fromkeys((config.planning.tokens, *config.planning.check_tokens)):
        scaled = config.validation.bench_iterations * config.planning.tokens // tokens
        iterations = min(MAX_CHECK_ITERATIONS, max(config.validation.bench_iterations, scaled))
        times = timed_against_dense(dense, {"planned": planned}, config, progress, iterations, tokens)
        ratios[tokens] = float(np.median(times["planned"]) / np.median(times["dense"]))
    return ratios


def next_target(target: float, predicted: float, measured: float) -> float:
    """The target to plan for next: `target` over the bias the clock found in the last prediction (measured /
    predicted), so that a plan predicted at the new target measures at `target` if the bias holds."""
    return target * predicted / measured


def wall_clock(model: onnx.ModelProto, eligible: list[LinearLayer], decompositions: dict[str, Decomposition],
               config: BuildConfig, progress: Progress) -> PlanClock:
    """The clock a build checks its plans with: each plan's model built and timed against `model` here."""
    def measure(plan: ShapePlan) -> dict[int, float]:
        factors = planned_factors(decompositions, plan.ranks)
        return measured_ratios(model, compressed_model(model, eligible, factors, plan.cuts), config, progress)
    return measure


def checked_shape_plan(config: BuildConfig, options: ShapeOptions, eligible: list[LinearLayer], budget: float,
                       loss: LossCurve, clock: PlanClock, progress: Progress) -> CheckedPlan:
    """Plan for the options' latency target; when the plan's latency was measured here, time each plan with `clock`
    against the dense model and plan again (module docstring) until the clock agrees with the target."""
    plan = plan_shapes(options, config, eligible, budget, loss)
    progress.note(plan.summary(options, config))
    if plan.resource != "latency" or options.timer.profile is not None:
        return CheckedPlan(plan)
    target = planned_for = options.target_latency
    tried: list[tuple[ShapePlan, float]] = []
    attempts = []
    for round_ in range(MAX_PLANS):
        if round_:
            try:
                plan = plan_shapes(options, config, eligible, budget, loss, planned_for)
            except BudgetError:  # the corrected target is out of reach: keep what was measured
                break
            progress.note(plan.summary(options, config) + f" (planned for ×{planned_for:.3f})")
        by_tokens = clock(plan)
        measured = max(by_tokens.values())
        progress.note("  measured " + ", ".join(f"×{ratio:.3f} at {tokens}" for tokens, ratio in by_tokens.items())
                      + f" tokens (target ×{target})")
        tried.append((plan, measured))
        attempts.append(PlanAttempt(planned_for=planned_for, predicted=plan.predicted_ratio, measured=measured,
                                    by_tokens={str(tokens): ratio for tokens, ratio in by_tokens.items()},
                                    distortion=plan.loss))
        if target * (1 - TOLERANCE) <= measured <= target:
            break
        planned_for = next_target(target, plan.predicted_ratio, measured)
    meeting = [(plan, measured) for plan, measured in tried if measured <= target]
    if meeting:
        plan, measured = min(meeting, key=lambda item: item[0].loss)
    else:
        plan, measured = min(tried, key=lambda item: item[1])
        progress.warn(f"--target-latency {target} missed: the fastest of {len(tried)} plans measured ×{measured:.3f} "
                      f"of dense at {'/'.join(map(str, (config.planning.tokens, *config.planning.check_tokens)))} tokens; lower the "
                      "target or allow more cuts (--plan unified)")
    return CheckedPlan(plan, measured, attempts)
