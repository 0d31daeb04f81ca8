"""What a plan tells the report (report.json's `latency_plan`): typed records instead of dicts read back by key.
Their fields are report.json's keys (see report/model.py's schema)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(kw_only=True)
class PlanAttempt:
    """One plan timed here by `--target-latency`'s clock check."""

    planned_for: float  # the latency ratio this plan was solved for (the target, corrected by the clock's bias)
    predicted: float
    measured: float  # the worst of by_tokens
    by_tokens: dict[str, float]  # {tokens: measured ratio}
    distortion: float  # the plan's predicted distortion


@dataclass(kw_only=True)
class ShapePlanRecord:
    """The unified plan (`--plan unified`, `--target-latency`): what it planned under, what it predicts and chose."""

    plan: str
    resource: str  # "latency" | "params"
    predicted_ratio: float
    scope: str
    tokens: int | None
    source: str | None  # where the latency was timed ("measured", a profile); None for a parameter budget
    target_latency: float | None
    predicted_distortion: float
    choices: list[str]
    measured_ratio: float | None = None  # median time over dense's, measured here by the clock check
    attempts: list[PlanAttempt] = field(default_factory=list)


@dataclass(kw_only=True)
class LatencyAwareRecord:
    """The low-rank plan with `--latency-aware` / `--profile`: the splits that do not pay, kept dense or not."""

    source: str
    tokens: int
    objective: str | None
    predicted_linear_ratio: float  # the linear layers' time under the plan over dense
    note: str
    kept_dense: list[str]


LatencyPlanRecord = ShapePlanRecord | LatencyAwareRecord
