"""The build configuration shared by the CLI and the Python API, in groups that each check themselves:
calibration (what the statistics are collected on), factorization (budget, method, splits, refit), cuts (the fixed
structured cuts), planning (which plan chooses, toward what target, timed where) and validation (held-out data,
tolerances, benchmark). `BuildConfig.from_options` routes the CLI's flat option names to their groups."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from lrdeploy.errors import OptionError
from lrdeploy.lowrank.allocate import ALLOCATIONS, check_budget_range
from lrdeploy.lowrank.decompose import METHODS
from lrdeploy.lowrank.refit import REFIT_MODES

LATENCY_BACKENDS = ("ort-cpu", "ort-cuda")  # where --latency-aware times layer shapes
PROFILE_BACKENDS = ("ort-cpu", "ort-cuda", "torch-cpu", "torch-cuda")  # what `lrdeploy profile` can time
OBJECTIVES = ("size", "latency")  # what --latency-aware gives up when splits that pay cannot meet the budget
SENSITIVITY_REACHES = ("auto", "block", "output")  # where a measured option's distortion is taken (stages.block_reach)
PLANS = ("auto", "lowrank", "unified")  # unified: per block, low-rank or a narrower FFN, fewer heads, or the block
# dropped; auto: unified unless the options ask for the low-rank plan (BuildConfig.default_plan)
OPTIMIZERS = ("none", "ort")  # ort: compress inside ONNX Runtime's transformer-fused graph (keeps the fusions)
QKV_FORMS = ("separate", "joint")  # joint: Q, K and V share one low-rank basis (passes/merge_qkv)
SPLIT_SCOPES = ("any", "ffn")  # ffn: only FFN up/down projections may be split (see FactorizationSettings.splits)


def check_choices(*options: tuple[str, Any, tuple[str, ...]]) -> None:
    """Every (option, value, choices) has one of its choices."""
    for option, value, choices in options:
        if value not in choices:
            raise OptionError(f"{option} {value!r} is not one of {', '.join(choices)}; pick one of those")


def check_token_options(check_tokens: tuple[int, ...], target_latency: float | None, profile: str | None) -> None:
    """--check-tokens only holds a latency target measured here (shared with `distill`'s early check)."""
    if check_tokens and (target_latency is None or profile is not None):
        raise OptionError("--check-tokens holds a --target-latency measured here; give --target-latency and leave "
                          "--profile out (a profile's plan is not timed on this machine)")


def default_cache_dir() -> Path:
    """$LRDEPLOY_CACHE_DIR, else $XDG_CACHE_HOME/lrdeploy, else ~/.cache/lrdeploy."""
    if os.environ.get("LRDEPLOY_CACHE_DIR"):
        return Path(os.environ["LRDEPLOY_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lrdeploy"


@dataclass(kw_only=True)
class CalibrationSettings:
    """What the statistics are collected on. `calib` is a file path or the string "random"."""

    calib: str = "random"
    calib_samples: int | None = None
    batch_size: int = 16
    mask_input: str | None = None  # the attention-mask input whose zeros mark padding; None: by name
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)  # dynamic input shapes for random data
    seed: int = 1

    def check(self) -> None:
        """Nothing to check beyond the CLI's types: the data itself is checked when it is read."""


@dataclass(kw_only=True)
class FactorizationSettings:
    """The low-rank splits: budget, method, rank grid, how Q, K and V are split, and the refit after them."""

    rank_budget: float = 0.5
    method: str = "pca"
    allocation: str | None = None  # None: "uniform", and `planning.plan="auto"` may choose the unified plan
    rank_multiple: int | None = None  # None: 64 for GPU targets (--profile, --backend ort-cuda), else 16
    qkv: str | None = None  # one of QKV_FORMS; None: separate on the plain graph (joint inside --optimize ort's)
    splits: str = "any"  # one of SPLIT_SCOPES; "ffn" for `distill --optimize ort`, whose student is exported plain
    # and fused again: ONNX Runtime's attention matcher needs Q, K, V and the output projection as single MatMuls
    refit: bool = False
    refit_samples: int = 512  # calibration samples the refit's joint statistics come from
    refit_mode: str = "both"  # "second": refit B and the bias; "both": reduced-rank regression of A and B

    def check(self) -> None:
        """The choices, the budget and the rank grid."""
        check_choices(("--method", self.method, METHODS), ("--allocation", self.allocation or "uniform", ALLOCATIONS),
                      ("--refit-mode", self.refit_mode, REFIT_MODES), ("--qkv", self.qkv or QKV_FORMS[0], QKV_FORMS),
                      ("splits", self.splits, SPLIT_SCOPES))
        check_budget_range(self.rank_budget)
        if self.rank_multiple is not None and self.rank_multiple < 1:
            raise OptionError(f"--rank-multiple {self.rank_multiple} must be at least 1; 16 or 64 suit tensor cores")


@dataclass(kw_only=True)
class CutSettings:
    """The fixed structured cuts, each applied to every block it matches (the plan chooses the rest)."""

    ffn_keep: float | None = None  # narrow every FFN block to this fraction of its neurons (the rest: low-rank)
    heads_keep: float | None = None  # keep this fraction of every self-attention's heads
    values_keep: float | None = None  # narrow every head's value/output width to this fraction of its head size
    drop_blocks: int = 0  # drop this many whole transformer blocks (the least harmful, measured)

    def check(self) -> None:
        """Fractions in (0, 1], a non-negative block count, and --values-keep without --heads-keep."""
        if self.drop_blocks < 0:
            raise OptionError(f"--drop-blocks {self.drop_blocks} is negative; pass how many blocks to drop")
        for option, keep in self.fractions():
            if keep is not None and not 0.0 < keep <= 1.0:
                raise OptionError(f"{option} {keep} is outside (0, 1]; pass e.g. {option} 0.5")
        if self.values_keep is not None and self.heads_keep is not None:
            raise OptionError("--values-keep cannot be combined with --heads-keep: both re-solve the same value and "
                              "output projections from the full heads' statistics; leave one of them out")

    def fractions(self) -> tuple[tuple[str, float | None], ...]:
        return (("--ffn-keep", self.ffn_keep), ("--heads-keep", self.heads_keep), ("--values-keep", self.values_keep))

    def given(self) -> list[str]:
        """The options of the cuts asked for."""
        return [option for option, value in (*self.fractions(), ("--drop-blocks", self.drop_blocks)) if value]


@dataclass(kw_only=True)
class PlanSettings:
    """Which plan chooses the cuts and ranks, toward what (a parameter budget or a latency target), and where its
    timings come from (measured here on `backend`, or a device `profile`)."""

    plan: str = "auto"  # one of PLANS; "auto" is resolved on construction (BuildConfig.default_plan)
    target_latency: float | None = None  # plan for at most this fraction of dense latency at `tokens` rows
    tokens: int = 4096  # rows of X (batch × sequence) of the latency timings
    check_tokens: tuple[int, ...] = ()  # a measured-here target must hold at these rows too (e.g. 128: batch 1)
    latency_aware: bool = False  # keep dense the layers whose split does not pay on `backend` (low-rank plan)
    profile: str | None = None  # plan with a device profile (a shipped name like "h200-fp16", or a file)
    objective: str | None = None  # when splits that pay cannot meet the budget: "size" or "latency"
    backend: str = "ort-cpu"  # where --latency-aware times layer shapes: one of LATENCY_BACKENDS
    sensitivity_samples: int | None = None  # samples each measured option runs on (None: 16, an LM's first window)
    sensitivity_reach: str = "auto"  # one of SENSITIVITY_REACHES; auto: "block" for a causal LM, else "output"

    def __post_init__(self) -> None:
        if self.profile is not None:
            self.latency_aware = True

    @property
    def gpu_target(self) -> bool:
        return self.profile is not None or self.backend == "ort-cuda"

    @property
    def plans_shapes(self) -> bool:
        """The knapsack over options (`planning.unified`) chooses, not the rank allocation alone."""
        return self.plan == "unified" or self.target_latency is not None

    def check(self) -> None:
        """The choices, a latency target in (0, 1) measured where --check-tokens asks, and --latency-aware only
        with the low-rank plan."""
        check_choices(("--backend", self.backend, LATENCY_BACKENDS), ("--plan", self.plan, PLANS),
                      ("--objective", self.objective or OBJECTIVES[0], OBJECTIVES))
        check_token_options(self.check_tokens, self.target_latency, self.profile)
        if self.target_latency is not None and not 0.0 < self.target_latency < 1.0:
            raise OptionError(f"--target-latency {self.target_latency} is outside (0, 1); pass the fraction of dense "
                              "latency to reach, e.g. --target-latency 0.6")
        if self.plans_shapes and self.latency_aware and self.profile is None:
            raise OptionError("--latency-aware cannot be combined with --plan unified or --target-latency (the plan "
                              "chooses every shape and rank itself); leave it out")


@dataclass(kw_only=True)
class ValidationSettings:
    """How the written model is judged: held-out inputs, Polygraphy's tolerances, neighbours, the benchmark."""

    eval: Path | None = None
    eval_samples: int | None = None
    atol: float = 1e-2
    rtol: float = 1e-1
    neighbours: int = 10  # k of the top-k nearest-neighbour agreement for per-sample vector outputs
    bench: bool = False
    bench_batches: tuple[int, ...] = (1, 8, 32)
    bench_seq: int = 128
    bench_iterations: int = 20

    def check(self) -> None:
        """Polygraphy's tolerances are finite and non-negative."""
        for option, value in (("--atol", self.atol), ("--rtol", self.rtol)):
            if not math.isfinite(value) or value < 0:
                raise OptionError(f"{option} {value} is not a tolerance; give a finite number ≥ 0, e.g. {option} 0.01")


GROUPS = {"calibration": CalibrationSettings, "factorization": FactorizationSettings, "cuts": CutSettings,
          "planning": PlanSettings, "validation": ValidationSettings}


def grouped(options: dict[str, Any], groups: dict[str, Callable[[], Any]] = GROUPS) -> dict[str, Any]:
    """Flat option names (the CLI's) routed to their groups, each over its default from `groups` (a factory per
    group): {"rank_budget": 0.5, "threads": 2} → {"factorization": FactorizationSettings(rank_budget=0.5), ...,
    "threads": 2}. Names of no group stay as given."""
    routed: dict[str, Any] = {}
    rest = dict(options)
    for name, factory in groups.items():
        default = factory()
        names = {f.name for f in dataclasses.fields(default)}
        routed[name] = dataclasses.replace(default, **{key: rest.pop(key) for key in list(rest) if key in names})
    return routed | rest


@dataclass(kw_only=True)
class BuildConfig:
    """Everything one `lrdeploy build` needs: the model, where outputs go, how the graph is prepared, and the
    settings groups."""

    model: Path
    reported_model: Path | None = None  # what reports name as the input, when `model` is a staged copy of it
    output_dir: Path | None = None
    cache_dir: Path | None = field(default_factory=default_cache_dir)
    threads: int = 0
    ray: str | None = None  # --ray: "auto" or a cluster's address; None: every measurement here (lrdeploy.jobs)
    optimize: str = "none"  # one of OPTIMIZERS
    num_heads: int = 0  # for --optimize ort; 0: read from the graph
    hidden_size: int = 0  # likewise
    calibration: CalibrationSettings = field(default_factory=CalibrationSettings)
    factorization: FactorizationSettings = field(default_factory=FactorizationSettings)
    cuts: CutSettings = field(default_factory=CutSettings)
    planning: PlanSettings = field(default_factory=PlanSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)

    def __post_init__(self) -> None:
        if self.factorization.rank_multiple is None:
            self.factorization.rank_multiple = 64 if self.planning.gpu_target else 16
        if self.planning.plan == "auto":
            self.planning.plan = self.default_plan()
        if self.factorization.allocation is None:
            self.factorization.allocation = "uniform"

    @classmethod
    def from_options(cls, **options: Any) -> BuildConfig:
        """A configuration from flat option names (the CLI's: rank_budget=…, ffn_keep=…), each routed to its group."""
        return cls(**grouped(options))

    def default_plan(self) -> str:
        """The plan `--plan auto` means: the unified plan, measured the most accurate at equal parameters and at
        equal latency (MiniLM at half the linear parameters 0.930 / top-10 0.696 against 0.846 / 0.620 for uniform
        low-rank, and faster; at ×0.62 of dense latency 0.950 against 0.728; docs/plans.md), unless an option asks
        for the low-rank plan: a fixed cut, `--qkv joint`, `--latency-aware` or a `--profile` without a target,
        weight SVD, or a chosen `--allocation`. `--plan lowrank` is the faster build (no option measured)."""
        f, p = self.factorization, self.planning
        low_rank = (self.cuts.given(), f.qkv == "joint", p.latency_aware, p.profile is not None and p.target_latency is None,
                    f.method == "svd", f.allocation is not None, f.splits != "any")
        return "lowrank" if any(low_rank) else "unified"

    @property
    def gpu_target(self) -> bool:
        return self.planning.gpu_target

    def check(self) -> None:
        """Every option value is one the build can use (before any work is done): each group, then the walls
        between groups that stay (each says why)."""
        check_choices(("--optimize", self.optimize, OPTIMIZERS))
        for group in (self.calibration, self.factorization, self.cuts, self.planning, self.validation):
            group.check()
        self._check_combinations()

    def _check_combinations(self) -> None:
        """What the maths or the graph forbids across groups."""
        fixed = self.cuts.given()
        if self.planning.target_latency is not None and fixed:
            raise OptionError(f"{', '.join(fixed)} cannot be combined with --target-latency (the latency plan times "
                              "the options it chooses, not fixed cuts); leave those out, or pass --plan unified "
                              "--rank-budget B with them (the plan chooses the rest under the parameter budget)")
        qkv = self.factorization.qkv
        if self.cuts.values_keep is not None:
            if self.optimize == "ort":
                raise OptionError("--values-keep cannot be combined with --optimize ort: the fused Attention packs one "
                                  "head size for Q, K and V; leave one of them out")
            if qkv == "joint":
                raise OptionError("--values-keep cannot be combined with --qkv joint: one basis for Q|K|V leaves no "
                                  "value projection of its own to narrow; leave one of them out")
        if qkv == "separate" and self.optimize == "ort":
            raise OptionError("--qkv separate cannot be combined with --optimize ort: the fused Attention packs Q, K and "
                              "V in one weight (always joint); leave --qkv out")
        if qkv == "joint":
            cuts = [name for name, value in (("--heads-keep", self.cuts.heads_keep), ("--drop-blocks", self.cuts.drop_blocks),
                                             ("--plan unified", self.planning.plan == "unified")) if value]
            if cuts:
                raise OptionError(f"--qkv joint cannot be combined with {', '.join(cuts)} yet (those cut Q, K and V "
                                  "as three layers); leave one of them out")

    @property
    def qkv_form(self) -> str:
        """How Q, K and V are split: "joint" (one basis) inside the ORT-fused graph or when asked, else "separate"."""
        return "joint" if self.optimize == "ort" else (self.factorization.qkv or "separate")

    @property
    def merges_qkv(self) -> bool:
        """The plain graph's Q, K, V are merged into one layer before calibration (`passes.merge_qkv`)."""
        return self.optimize == "none" and self.qkv_form == "joint"

    @property
    def graph_variant(self) -> str:
        """What the compressed graph is made from, for cache keys: "" for the model as given."""
        return "+".join(v for v in ("" if self.optimize == "none" else self.optimize,
                                    "qkv-joint" if self.merges_qkv else "") if v)

    @property
    def plans_shapes(self) -> bool:
        return self.planning.plans_shapes

    def changes_nothing(self, budgets: tuple[float, ...]) -> bool:
        """Every budget keeps every linear parameter and no cut or latency target is asked for: the model is
        written as it is, with nothing calibrated, decomposed or measured."""
        return (all(budget >= 1.0 for budget in budgets) and self.planning.target_latency is None
                and not self.cuts.given() and self.factorization.qkv != "joint")

    @property
    def measures_sensitivity(self) -> bool:
        """The plan needs each layer's measured output distortion per rank."""
        return self.factorization.allocation == "sensitivity" or self.plans_shapes

    @property
    def resolved_output_dir(self) -> Path:
        """-o/--output-dir, by default the input model's folder."""
        return Path(self.output_dir) if self.output_dir is not None else Path(self.model).parent

    @property
    def output_model(self) -> Path:
        stem = Path(self.model).name.removesuffix(".onnx")
        return self.resolved_output_dir / f"{stem}.lowrank.onnx"
