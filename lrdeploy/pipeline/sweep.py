"""`lrdeploy sweep`: calibrate once, build several budgets, report accuracy and latency per budget; or find
the smallest budget that meets an accuracy target by bisection and keep only that model.

Bisection assumes accuracy rises with the budget (more rank never discards more of any layer's spectrum);
every budget it evaluates is reported, so a non-monotone curve is visible in the table and plots.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lrdeploy.bench.html import render_build_html
from lrdeploy.bench.measure import BenchSettings
from lrdeploy.bench.report import write_reports
from lrdeploy.errors import BudgetError
from lrdeploy.files import atomic_write_text, prepare_output_dir
from lrdeploy.lowrank.allocate import realized_ratio
from lrdeploy.pipeline.bench import BenchConfig, run_bench
from lrdeploy.pipeline.build import BuildResult, Finetuner, PreparedBuild, prepare_build, realize_build
from lrdeploy.pipeline.config import BuildConfig

METRICS = ("cosine_mean", "cosine_p5", "topk_agreement")


@dataclass
class SweepPoint:
    budget: float
    linear_ratio: float
    model_ratio: float
    cosine_mean: float
    cosine_p5: float
    topk_agreement: float | None
    latency_ratio: float | None
    output_model: str | None


    @classmethod
    def from_build(cls, budget: float, result: BuildResult, output: str, latency_ratio: float | None) -> "SweepPoint":
        """The point of one budget's build, read from its report (accuracy of `output`)."""
        params, accuracy = result.report.params, result.report.accuracy.outputs[output]
        return cls(budget, params.linear_ratio, params.model_ratio, accuracy.cosine_mean, accuracy.cosine_p5,
                   accuracy.topk_agreement, latency_ratio, str(result.output_model))


@dataclass
class SweepReport:
    model: str
    output: str
    metric: str
    target: float | None
    chosen: float | None
    points: list[SweepPoint] = field(default_factory=list)


def parse_target(target_cosine: float | None, target_metric: str | None) -> tuple[str, float | None]:
    """(metric, value) from --target-cosine X or --target-metric NAME=VALUE."""
    if target_metric is None:
        return "cosine_mean", target_cosine
    name, sep, value = target_metric.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or name not in METRICS or number is None:
        raise BudgetError(f"--target-metric {target_metric!r} is not NAME=VALUE with NAME one of {', '.join(METRICS)}; "
                          "write it like topk_agreement=0.85")
    return name, number


class Sweep:
    """Builds budgets from one PreparedBuild, measuring each once; results in `points` by budget."""

    def __init__(self, prepared: PreparedBuild, output: str | None, bench_batch: int | None, bench_seq: int,
                 bench_iterations: int = 10, finetune: Finetuner | None = None):
        self.prepared, self.finetune = prepared, finetune
        self.output = output or next(iter(_output_names(prepared)))
        self.bench_batch, self.bench_seq, self.bench_iterations = bench_batch, bench_seq, bench_iterations
        self.results: dict[float, BuildResult] = {}
        self.points: dict[float, SweepPoint] = {}

    def directory(self, budget: float) -> Path:
        return self.prepared.config.resolved_output_dir / f"rho_{budget:.3f}"

    def evaluate(self, budget: float) -> SweepPoint:
        budget = round(budget, 4)
        if budget in self.points:
            return self.points[budget]
        result = realize_build(self.prepared, budget, self.directory(budget), finetune=self.finetune)
        accuracy = result.report.accuracy.outputs[self.output]
        latency_ratio = None
        if self.bench_batch:
            config = self.prepared.config
            bench = run_bench(BenchConfig([str(config.model), str(result.output_model)], "ort-cpu", (self.bench_batch,),
                                          self.bench_seq, BenchSettings(warmup=2, iterations=self.bench_iterations), config.threads))
            latency_ratio = bench.shapes[0].ratio_p50
        self.results[budget] = result
        self.points[budget] = SweepPoint.from_build(budget, result, self.output, latency_ratio)
        if self.prepared.console is not None:
            self.prepared.console.print(
                f"ρ={budget:.3f}: cosine {accuracy.cosine_mean:.4f}"
                + (f", top-k {accuracy.topk_agreement:.3f}" if accuracy.topk_agreement is not None else "")
                + (f", latency ratio {latency_ratio:.3f}" if latency_ratio is not None else ""))
        return self.points[budget]


def _output_names(prepared: PreparedBuild) -> list[str]:
    return [o.name for o in prepared.inspection.model.proto.graph.output]


def bisect_budget(sweep: Sweep, metric: str, target: float, low: float, tolerance: float = 0.02,
                  max_builds: int = 8) -> float | None:
    """Smallest evaluated budget in [low, 1] whose metric meets `target`, narrowed to `tolerance`."""
    def meets(budget: float) -> bool:
        value = getattr(sweep.evaluate(budget), metric)
        return value is not None and value >= target

    if not meets(1.0):
        return None
    high = 1.0
    if meets(low):
        return low
    while high - low > tolerance and len(sweep.points) < max_builds:
        middle = (low + high) / 2
        if meets(middle):
            high = middle
        else:
            low = middle
    return round(high, 4)


def _keep_only(sweep: Sweep, chosen: float | None, output_dir: Path) -> None:
    """Move the chosen budget's model (and external data) to `output_dir`, rewrite its reports there, and
    delete every budget's folder."""
    for budget in list(sweep.points):
        folder = sweep.directory(budget)
        if budget == chosen:
            result = sweep.results[budget]
            model = output_dir / result.output_model.name
            for item in folder.glob(f"{result.output_model.name}*"):  # the model and its .data file
                item.replace(output_dir / item.name)
            result.output_model = model
            result.report.output_model = sweep.points[budget].output_model = str(model)
            result.report_json, result.report_md, result.report_html = write_reports(result.report, output_dir)
        else:
            sweep.points[budget].output_model = None
        shutil.rmtree(folder, ignore_errors=True)


def run_sweep(config: BuildConfig, budgets: list[float], console=None, metric: str = "cosine_mean",
              target: float | None = None, output: str | None = None, bench_batch: int | None = 32,
              bench_seq: int = 128, bench_iterations: int = 10, finetune: Finetuner | None = None) -> SweepReport:
    """Build every budget (or bisect toward `target`), fine-tuning each if `finetune` is given; write
    sweep.json, sweep.md and report.html."""
    prepared = prepare_build(config, console, tuple(budgets) if target is None else ())
    if output is not None and output not in _output_names(prepared):
        raise BudgetError(f"--output {output!r} is not a model output ({', '.join(_output_names(prepared))})")
    sweep = Sweep(prepared, output, bench_batch, bench_seq, bench_iterations, finetune)
    output_dir = prepare_output_dir(config.resolved_output_dir)
    chosen = None
    if target is None:
        for budget in budgets:
            sweep.evaluate(budget)
    else:
        multiple = config.rank_multiple
        low = max(0.05, realized_ratio(prepared.shapes, {s.name: multiple for s in prepared.shapes}))
        chosen = bisect_budget(sweep, metric, target, round(low + 1e-4, 4))
        _keep_only(sweep, chosen, output_dir)
    report = SweepReport(str(config.model), sweep.output, metric, target, chosen,
                         sorted(sweep.points.values(), key=lambda p: -p.budget))
    write_sweep(report, sweep, output_dir)
    return report


def sweep_markdown(report: SweepReport) -> str:
    lines = [f"# lrdeploy sweep: {report.model}", "", f"output `{report.output}`", "",
             "| ρ | linear kept | model kept | cosine mean | cosine p5 | top-k agreement | latency ratio | model |",
             "|---|---|---|---|---|---|---|---|"]
    for p in report.points:
        cells = [f"{p.budget:.3f}", f"{p.linear_ratio:.3f}", f"{p.model_ratio:.3f}", f"{p.cosine_mean:.4f}",
                 f"{p.cosine_p5:.4f}", "" if p.topk_agreement is None else f"{p.topk_agreement:.3f}",
                 "" if p.latency_ratio is None else f"{p.latency_ratio:.3f}", p.output_model or "(not kept)"]
        lines.append("| " + " | ".join(cells) + " |")
    if report.target is not None:
        lines += ["", f"Target {report.metric} ≥ {report.target}: " + (
            f"smallest budget meeting it ρ={report.chosen:.3f}" if report.chosen is not None else "not met")]
    return "\n".join(lines) + "\n"


def write_sweep(report: SweepReport, sweep: Sweep, output_dir: Path) -> None:
    atomic_write_text(output_dir / "sweep.json", json.dumps(dataclasses.asdict(report), indent=2) + "\n")
    atomic_write_text(output_dir / "sweep.md", sweep_markdown(report))
    main = sweep.results.get(report.chosen) if report.chosen is not None else None
    main = main or sweep.results[min(sweep.results, key=lambda b: abs(b - sweep.prepared.config.rank_budget))]
    atomic_write_text(output_dir / "report.html", render_build_html(main.report, report, "lrdeploy sweep report"))
