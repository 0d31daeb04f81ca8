"""`lrdeploy sweep`: calibrate once, build several budgets, report accuracy and latency per budget; or find
the smallest budget that meets an accuracy target by bisection and keep only that model.

Bisection assumes accuracy rises with the budget (more rank never discards more of any layer's spectrum);
every budget it evaluates is reported, so a non-monotone curve is visible in the table and plots.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

from lrdeploy.bench.measure import BenchSettings
from lrdeploy.errors import OptionError
from lrdeploy.files import output_set
from lrdeploy.lowrank.allocate import minimum_ratio
from lrdeploy.bench.run import BenchConfig, run_bench
from lrdeploy.pipeline.build import (BuildResult, Finetuner, PreparedBuild, held_output_dir, prepare_build,
                                     realize_build)
from lrdeploy.settings.build import BuildConfig
from lrdeploy.progress import SILENT, Progress, StageTimer
from lrdeploy.report.files import REPORT_FILES, write_reports, write_sweep
from lrdeploy.report.model import LOWER_IS_BETTER, SweepPoint, SweepReport

METRICS = ("cosine_mean", "cosine_p5", "topk_agreement", "ppl_ratio", "top1_agreement", "kl")
NEXT_TOKEN_METRICS = ("ppl_ratio", "top1_agreement", "kl")  # measured on a causal LM's logits only


def meets_target(metric: str, value: float | None, target: float) -> bool:
    """Whether a measured value satisfies the target: at most it for perplexity ratio and KL, at least it otherwise."""
    if value is None:
        return False
    return value <= target if metric in LOWER_IS_BETTER else value >= target

@dataclass
class SweepSettings:
    """Which budgets to build (or, with `target`, the metric to bisect toward), which output the metrics are read
    from (default: the first), and the latency ratio per budget (`bench_batch` None: none)."""

    budgets: list[float] = field(default_factory=lambda: [0.9, 0.7, 0.5, 0.3])
    metric: str = "cosine_mean"
    target: float | None = None
    output: str | None = None
    bench_batch: int | None = 32
    bench_seq: int = 128
    bench_iterations: int = 10


def parse_target(target_cosine: float | None, target_metric: str | None) -> tuple[str, float | None]:
    """(metric, value) from --target-cosine X or --target-metric NAME=VALUE: ppl_ratio ≥ 1, kl > 0, the others in
    (0, 1]."""
    if target_metric is None:
        if target_cosine is not None and not 0.0 < target_cosine <= 1.0:  # false for NaN too
            raise OptionError(f"--target-cosine {target_cosine} is outside (0, 1]; pass e.g. --target-cosine 0.98")
        return "cosine_mean", target_cosine
    name, sep, value = target_metric.partition("=")
    try:
        number = float(value)
    except ValueError:
        number = None
    if not sep or name not in METRICS or number is None:
        raise OptionError(f"--target-metric {target_metric!r} is not NAME=VALUE with NAME one of {', '.join(METRICS)}; "
                          "write it like topk_agreement=0.85 or ppl_ratio=1.1")
    if name == "ppl_ratio" and not number >= 1.0:
        raise OptionError(f"--target-metric {target_metric!r}: a perplexity ratio below 1 would be better than the "
                          "dense model; write it like ppl_ratio=1.1")
    if name == "kl" and not number > 0.0:
        raise OptionError(f"--target-metric {target_metric!r}: KL is positive; write it like kl=0.1 (nats per token)")
    if name not in LOWER_IS_BETTER and not 0.0 < number <= 1.0:
        raise OptionError(f"--target-metric {target_metric!r}: {number} is outside (0, 1]; write it like "
                          f"{name}=0.85")
    return name, number


def output_names(prepared: PreparedBuild) -> list[str]:
    return [o.name for o in prepared.inspection.model.proto.graph.output]


def output_ranks(prepared: PreparedBuild) -> dict[str, int | None]:
    """Each model output's rank as the graph declares it (None where it declares no shape)."""
    return {o.name: len(o.type.tensor_type.shape.dim) if o.type.tensor_type.HasField("shape") else None
            for o in prepared.inspection.model.proto.graph.output}


def next_token_logits(prepared: PreparedBuild, output: str) -> bool:
    """`output` is declared [batch, T, vocabulary] of a model that reads input_ids: what `stages.next_token`
    scores (the measurement itself checks the vocabulary covers the ids fed)."""
    inputs = {i.name for i in prepared.inspection.model.proto.graph.input}
    return output_ranks(prepared).get(output) == 3 and "input_ids" in inputs


class Sweep:
    """Builds budgets from one PreparedBuild, each once, into `rho_<budget>/` folders of `stage` (the staging
    folder of the output folder `published`, where they appear only when the whole run succeeds); results by
    budget. Nothing outside `stage` is written or removed here."""

    def __init__(self, prepared: PreparedBuild, settings: SweepSettings, stage: Path, published: Path,
                 progress: Progress = SILENT, finetune: Finetuner | None = None):
        self.prepared, self.settings, self.progress, self.finetune = prepared, settings, progress, finetune
        self.stage, self.published = Path(stage), Path(published)
        self.output = settings.output or output_names(prepared)[0]
        self.results: dict[float, BuildResult] = {}
        self.points: dict[float, SweepPoint] = {}

    @staticmethod
    def folder_name(budget: float) -> str:
        return f"rho_{budget:.3f}"

    def directory(self, budget: float) -> Path:
        """Where the budget is built: inside the stage."""
        return self.stage / self.folder_name(budget)

    def _latency_ratio(self, result: BuildResult) -> float | None:
        settings, config = self.settings, self.prepared.config
        if not settings.bench_batch:
            return None
        bench = run_bench(BenchConfig([str(config.model), str(result.output_model)], "ort-cpu",
                                      batches=(settings.bench_batch,), seq=settings.bench_seq,
                                      settings=BenchSettings(warmup=2, iterations=settings.bench_iterations),
                                      threads=config.threads))
        return bench.shapes[0].ratio_p50

    def evaluate(self, budget: float) -> SweepPoint:
        budget = round(budget, 4)
        if budget in self.points:
            return self.points[budget]
        result = realize_build(self.prepared, budget, self.directory(budget), self.progress, finetune=self.finetune,
                               published_dir=self.published / self.folder_name(budget))
        self.add(budget, result, self._latency_ratio(result))
        point = self.points[budget]
        self.progress.note(f"ρ={budget:.3f}: cosine {point.cosine_mean:.4f}"
                           + (f", top-k {point.topk_agreement:.3f}" if point.topk_agreement is not None else "")
                           + (f", perplexity ×{point.ppl_ratio:.3f}, top-1 {point.top1_agreement:.3f}"
                              if point.ppl_ratio is not None else "")
                           + (f", latency ratio {point.latency_ratio:.3f}" if point.latency_ratio is not None else ""))
        return point

    def add(self, budget: float, result: BuildResult, latency_ratio: float | None) -> None:
        """Record a budget's build (also one built elsewhere, e.g. the demo's main model)."""
        self.results[budget] = result
        self.points[budget] = SweepPoint.from_report(budget, result.report, self.output, latency_ratio)

    def keep_only(self, chosen: float | None) -> None:
        """Move the chosen budget's model (and external data) to the top of the stage, write its reports there, and
        delete every budget's staged folder (this run's own); the other points keep their figures, not their
        models (with `chosen` None, no model is kept)."""
        for budget in list(self.points):
            folder = self.directory(budget)
            if budget == chosen:
                result = self.results[budget]
                for item in folder.glob(f"{result.output_model.name}*"):  # the model and its .data file
                    item.replace(self.stage / item.name)
                result.output_model = self.published / result.output_model.name
                result.report.output_model = self.points[budget].output_model = str(result.output_model)
                write_reports(result.report, self.stage)
                result.report_json, result.report_md, result.report_html = (self.published / n for n in REPORT_FILES)
            else:
                self.points[budget].output_model = None
            shutil.rmtree(folder)

    def published_paths(self) -> None:
        """Point every kept budget's result at where its files are once the stage is published."""
        for budget, result in self.results.items():
            if result.output_model.parent == self.directory(budget):
                target = self.published / self.folder_name(budget)
                result.output_model = target / result.output_model.name
                result.report_json, result.report_md, result.report_html = (target / n for n in REPORT_FILES)


def bisect_budget(sweep: Sweep, metric: str, target: float, low: float, tolerance: float = 0.02,
                  max_builds: int = 8) -> float | None:
    """Smallest evaluated budget in [low, 1] whose metric meets `target`, narrowed to `tolerance`."""
    def meets(budget: float) -> bool:
        return meets_target(metric, getattr(sweep.evaluate(budget), metric), target)

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


def run_sweep(config: BuildConfig, settings: SweepSettings, progress: Progress = SILENT,
              finetune: Finetuner | None = None, earlier: StageTimer | None = None) -> SweepReport:
    """Build every budget (or bisect toward `settings.target`), fine-tuning each if `finetune` is given; write
    sweep.json, sweep.md and report.html. `earlier`: a caller's stages, as for `prepare_build`."""
    with held_output_dir(config):
        return _sweep(config, settings, progress, finetune, earlier)


def _sweep(config: BuildConfig, settings: SweepSettings, progress: Progress, finetune: Finetuner | None,
           earlier: StageTimer | None) -> SweepReport:
    budgets = tuple(settings.budgets) if settings.target is None else ()
    prepared = prepare_build(config, progress, budgets, earlier, any_budget=settings.target is not None)
    if settings.output is not None and settings.output not in output_names(prepared):
        raise OptionError(f"--output {settings.output!r} is not a model output ({', '.join(output_names(prepared))}); "
                          "pass one of those")
    if settings.target is not None and settings.metric in NEXT_TOKEN_METRICS:
        output = settings.output or output_names(prepared)[0]
        if not next_token_logits(prepared, output):
            raise OptionError(f"{settings.metric} is measured on a causal LM's logits ([batch, T, vocabulary] over the "
                              f"input_ids fed); {output!r} is not such an output: target cosine_mean, or pick the "
                              "logits with --output")
    if settings.target is not None and settings.metric == "topk_agreement":
        output = settings.output or output_names(prepared)[0]
        rank = output_ranks(prepared).get(output)
        if rank != 2:
            raise OptionError(f"topk_agreement is measured only for outputs of one vector per sample ([batch, d]); "
                              f"{output!r} has rank {rank}: target cosine_mean or cosine_p5, or pick such an "
                              "output with --output")
    output_dir = config.resolved_output_dir
    chosen = None
    with output_set(output_dir) as stage:  # every budget is built in the stage: a failed run leaves none of them
        sweep = Sweep(prepared, settings, stage, output_dir, progress, finetune)
        if settings.target is None:
            for budget in settings.budgets:
                sweep.evaluate(budget)
        else:
            low = max(0.05, minimum_ratio(prepared.shapes, config.factorization.rank_multiple))
            chosen = bisect_budget(sweep, settings.metric, settings.target, round(low + 1e-4, 4))
            sweep.keep_only(chosen)
        report = SweepReport(str(config.reported_model or config.model), sweep.output, settings.metric, settings.target, chosen,
                             sorted(sweep.points.values(), key=lambda p: -p.budget))
        main = sweep.results[chosen] if chosen is not None else sweep.results[
            min(sweep.results, key=lambda b: abs(b - config.factorization.rank_budget))]
        write_sweep(report, main.report, stage)
    sweep.published_paths()
    return report
