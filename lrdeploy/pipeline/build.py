"""`lrdeploy build`: one compression run, top to bottom as in DESIGN §2.

    prepare_build (once per model and data; a sweep shares it across budgets):
        model.onnx ─inspect─► [LinearLayer] ─calibrate─► {input tensor: Moments} ─decompose─► spectra
        [─sensitivity─► {layer: {rank: output distortion}}]
    realize_build (once per budget):
        ─choose_factors: allocate─► RankPlan [─refit─► factors] [─finetune─► trained model]
        ─factorize─► model.lowrank.onnx ─validate (Polygraphy)─► AccuracyReport [─bench─► LatencyReport]
        ─► report.json, report.md, report.html

Every user error surfaces as an LrdeployError before the first output file is written; outputs are
written atomically and never over the input.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from contextlib import ExitStack, contextmanager
from functools import partial
from typing import Iterator, Protocol

import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper

from lrdeploy.bench.measure import BenchSettings
from lrdeploy.calib.data import Feeds, detect_mask_input, model_input_specs, require_batch_axes
from lrdeploy.calib.stats import TensorRequest
from lrdeploy.files import check_name_length, check_output_dir, output_lock, output_set, refuse_overwriting_inputs
from lrdeploy.jobs import SERIAL, Jobs, jobs_on
from lrdeploy.weights_out import write_constants_out
from lrdeploy.lowrank.allocate import LayerShape, RankPlan, allocate, check_budget, rank_ceilings
from lrdeploy.lowrank.decompose import Decomposition, LowRankFactors, decompose, planned_factors
from lrdeploy.onnx_io import check_model, count_parameters, external_data_name, matrix_elements, save_model
from lrdeploy.passes.compose import compressed_model
from lrdeploy.passes.index_inputs import index_limits
from lrdeploy.passes.ort_fusion import fused_op_counts
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.bench.run import BenchConfig, run_bench
from lrdeploy.calib.cache import StatisticsCache
from lrdeploy.stages.calibrate import calibrate, keep_thin_layers_dense
from lrdeploy.settings.build import BuildConfig
from lrdeploy.stages.inspect import Inspection, inspect_fused, inspect_merged_qkv, inspect_model
from lrdeploy.planning.latency_aware import LatencyPlan, plan_for_latency
from lrdeploy.planning.clock_check import checked_shape_plan, wall_clock
from lrdeploy.report.plan_records import ShapePlanRecord
from lrdeploy.stages.outputs import input_files, output_files
from lrdeploy.progress import SILENT, Progress, StageTimer
from lrdeploy.stages.refit import RefitPlan, RefitSettings, refit_plan, refit_stages
from lrdeploy.stages.rewrite_check import check_claimed_changes
from lrdeploy.pipeline.report_assembly import BuildOutcome, assemble_report, record_metadata
from lrdeploy.stages.spectra import spectra
from lrdeploy.stages.memory import check_statistics_fit
from lrdeploy.stages.streamed import streamed_statistics
from lrdeploy.stages.samples import BuildSamples, prepare_samples
from lrdeploy.planning.blocks import block_ends, find_block_parts, structure_requests
from lrdeploy.planning.options import ShapeOptions, shape_options
from lrdeploy.passes.compose import StructuredCuts
from lrdeploy.planning.cuts import StructuredBlocks, splittable
from lrdeploy.stages.sensitivity import SensitivityTable, measured_sensitivity, sensitivity_loss
from lrdeploy.stages.validate import compare_models
from lrdeploy.report.files import REPORT_FILES, write_bench, write_reports
from lrdeploy.report.model import BuildReport, FinetuneRecord


@dataclass
class BuildResult:
    report: BuildReport
    output_model: Path
    report_json: Path
    report_md: Path
    report_html: Path


@dataclass(kw_only=True)
class PreparedBuild:
    """Everything that does not depend on the budget: loaded model, samples, statistics, decompositions, and the
    seconds each stage took. A sweep prepares once and realizes many budgets from it."""

    config: BuildConfig
    inspection: Inspection
    eligible: list[LinearLayer]
    feeds: Feeds
    samples: BuildSamples
    decompositions: dict[str, Decomposition]
    spectra: dict[str, dict[str, list[float]]]
    timings: dict[str, float]
    peaks: dict[str, float]  # peak resident MiB at each stage's end
    sensitivity: SensitivityTable | None = None
    structured: StructuredCuts = field(default_factory=StructuredCuts)  # --ffn-keep, --heads-keep
    shape_options: ShapeOptions | None = None  # --plan unified / --target-latency: what the plan chooses from

    @property
    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.eligible]


def prepare_build(config: BuildConfig, progress: Progress = SILENT, budgets: tuple[float, ...] = (),
                  earlier: StageTimer | None = None, any_budget: bool = False) -> PreparedBuild:
    """Load, check inputs, calibrate and decompose; every user error surfaces here, before outputs exist.
    `budgets`: those that will be realized (default the config's), unless `any_budget` (a bisection's are found as
    it goes). `earlier`: a caller's stages (e.g. export), reported before these."""
    config.check()
    timer = StageTimer(progress, earlier and earlier.timings, earlier and earlier.peaks)
    bounded = bounded_by_group(config)
    with timer.stage("load"):
        inspection = inspect_model(config.model, config.factorization.rank_multiple, map_weights=bounded)
        eligible = inspection.require_eligible()
        check_output_dir(config.resolved_output_dir)
        for output in output_files(config.output_model):
            check_name_length(output, "give the model a shorter file name (its outputs add .lowrank.onnx.data)")
        refuse_overwriting_inputs(output_files(config.output_model), input_files(config, inspection.model))
        require_batch_axes(inspection.model.proto)
        specs = model_input_specs(inspection.model.proto)
        feeds = Feeds(specs, config.calibration.batch_size, detect_mask_input(specs, config.calibration.mask_input))
        samples = prepare_samples(config, specs, feeds.mask_name, index_limits(inspection.graph))
    for warning in samples.warnings:
        progress.warn(warning)
    if config.optimize == "ort":
        with timer.stage("optimize"):
            inspection = inspect_fused(inspection, config.factorization.rank_multiple, config.num_heads, config.hidden_size)
            eligible = inspection.require_eligible()
            feeds = Feeds(model_input_specs(inspection.model.proto), config.calibration.batch_size, feeds.mask_name)
        say_what_was_fused(fused_op_counts(inspection.model.proto), progress)
    if config.merges_qkv:
        with timer.stage("merge qkv"):
            inspection = inspect_merged_qkv(inspection, config.factorization.rank_multiple)
            eligible = inspection.require_eligible()
    blocks = StructuredBlocks.find(config, inspection)
    if config.cuts.drop_blocks:
        with timer.stage("depth"):
            blocks.choose_drops(config, inspection, samples.probe(config.planning.sensitivity_samples, inspection.model.proto), feeds)
    eligible = blocks.remaining(splittable(config, inspection, eligible), budgets or (config.factorization.rank_budget,))
    found = (find_block_parts(config, inspection.graph, inspection.layers)
             if config.planning.plan == "unified" or config.measures_sensitivity else [])
    parts = found if config.planning.plan == "unified" else []
    unchanged = config.changes_nothing(budgets or (config.factorization.rank_budget,))  # nothing to calibrate, decompose, measure
    parts = [] if unchanged else parts
    for budget in budgets or (config.factorization.rank_budget,):
        if eligible:
            check_budget([layer.shape for layer in eligible], budget, config.factorization.rank_multiple)
    cache = StatisticsCache(config.cache_dir, [inspection.model.path, *inspection.model.external_files],
                            config.graph_variant)

    ceilings = rank_ceilings([layer.shape for layer in eligible], config.factorization.rank_multiple,
                             () if any_budget or not plans_uniform_ranks(config) else
                             budgets or (config.factorization.rank_budget,))
    moments = None
    if bounded and config.factorization.method != "svd" and not unchanged:
        streamed = streamed_statistics(inspection.model, eligible, samples.calib, feeds, cache,
                                       config.factorization.method, ceilings, timer, config.threads)
        if streamed.cached:
            progress.note("  (statistics from cache)")
        return PreparedBuild(config=config, inspection=inspection, eligible=streamed.eligible, feeds=feeds,
                             samples=samples, decompositions=streamed.decompositions, spectra=streamed.spectra,
                             timings=timer.timings, peaks=timer.peaks)
    if config.factorization.method != "svd" and not unchanged:
        with timer.stage("calibrate"):
            requests = [TensorRequest(layer.input_name, layer.d_in) for layer in eligible]
            requests += blocks.requests() + structure_requests(parts)
            check_statistics_fit(requests, eligible)
            moments, cached = calibrate(inspection.model, requests, samples.calib, feeds, cache, config.threads,
                                        progress)
        if cached:
            progress.note("  (statistics from cache)")
        eligible = keep_thin_layers_dense(eligible, moments, feeds.mask_name, progress)
    with timer.stage("decompose"):
        decompositions = {layer.name: decompose(config.factorization.method, layer.weight, layer.bias,
                                                None if moments is None else moments[layer.input_name],
                                                max_rank=ceilings[layer.name])
                          for layer in ([] if unchanged else eligible)}
        layer_spectra = spectra(eligible, moments, decompositions)
        structured = blocks.cut(config, moments) if moments is not None else StructuredCuts()
    sensitivity, options = None, None
    probe = samples.probe(config.planning.sensitivity_samples, inspection.model.proto)
    with ExitStack() as held:
        jobs: Jobs = SERIAL
        if config.ray is not None and not unchanged and (config.measures_sensitivity or config.planning.plans_shapes):
            with timer.stage("ray start"):
                jobs = held.enter_context(jobs_on(config.ray))
            progress.note(f"  Ray: measurements as tasks on {jobs.workers} CPUs")
        if config.measures_sensitivity and not unchanged:
            with timer.stage("sensitivity"):
                sensitivity = measured_sensitivity(inspection.model.proto, eligible, decompositions, probe, feeds,
                                                   config, cache, progress, jobs, block_ends(found))
        if config.planning.plans_shapes and not unchanged:
            with timer.stage("shape options"):
                options = shape_options(config, inspection.model.proto, parts, moments, eligible, decompositions,
                                        probe, feeds, cache, progress, structured, inspection.layers, jobs)
    return PreparedBuild(config=config, inspection=inspection, eligible=eligible, feeds=feeds, samples=samples,
                         decompositions=decompositions, spectra=layer_spectra, timings=timer.timings, peaks=timer.peaks,
                         sensitivity=sensitivity, structured=structured, shape_options=options)


def plans_uniform_ranks(config: BuildConfig) -> bool:
    """Whether every layer's rank follows from its shape and the budget alone (no measured plan, no latency)."""
    return (config.factorization.allocation == "uniform" and config.planning.plan == "lowrank"
            and not config.measures_sensitivity and not config.planning.latency_aware)


def bounded_by_group(config: BuildConfig) -> bool:
    """Whether the build can calibrate and decompose group by group with its weights mapped, never holding the
    whole model's statistics or weights (`stages.streamed`): the low-rank plan with ranks from the budget, no cut,
    refit or graph rewrite before calibration, which are what read the moments or weights again later."""
    return (plans_uniform_ranks(config) and not config.cuts.given() and not config.factorization.refit
            and config.optimize != "ort" and not config.merges_qkv)


def say_what_was_fused(fused: dict[str, int], progress: Progress) -> None:
    """`--optimize ort` tells what ONNX Runtime's optimizer fused, and warns when it fused no Attention: the build
    then compresses unfused attention, and the dense baseline a user ships is no faster for the optimizer."""
    progress.note("  ONNX Runtime fused: " + (", ".join(f"{count} {op}" for op, count in fused.items()) or "nothing"))
    if not fused.get("Attention"):
        progress.warn("ONNX Runtime's transformer optimizer fused no Attention in this model: its matcher knows the "
                      "BERT-style attention of Optimum's and torch's legacy exports (separate Q, K, V MatMuls, "
                      "softmax, context MatMul), not fused SDPA nor rotary or grouped-query attention; the build "
                      "compresses the attention as it is")


@dataclass(kw_only=True)
class ChosenFactors:
    """What one budget turns a PreparedBuild into: the rank plan and the (optionally refit) factors per split."""

    plan: RankPlan
    factors: dict[str, LowRankFactors]
    structured: StructuredCuts
    latency: LatencyPlan | None = None
    shape_plan: ShapePlanRecord | None = None  # the unified plan's record (--plan unified / --target-latency)


def choose_factors(prepared: PreparedBuild, budget: float, timer: StageTimer | None = None) -> ChosenFactors:
    """Allocate ranks for `budget` (latency-aware if configured) and refit the factors if configured."""
    config, timer = prepared.config, timer or StageTimer()
    latency, structured, shape_record = None, prepared.structured, None
    with timer.stage("allocate"):
        energies = {name: d.energies for name, d in prepared.decompositions.items()}
        if config.changes_nothing((budget,)):
            return ChosenFactors(plan={shape.name: None for shape in prepared.shapes}, factors={},
                                 structured=structured)
        loss = None if prepared.sensitivity is None else sensitivity_loss(prepared.sensitivity, energies)
        if prepared.shape_options is not None:
            clock = wall_clock(prepared.inspection.model.proto, prepared.eligible, prepared.decompositions, config,
                               timer.progress)
            checked = checked_shape_plan(config, prepared.shape_options, prepared.eligible, budget, loss, clock,
                                         timer.progress)
            plan, structured = checked.plan.ranks, checked.plan.cuts
            shape_record = checked.record(prepared.shape_options, config)
        elif config.planning.latency_aware:
            latency = plan_for_latency(config, prepared.shapes, budget, energies, loss, timer.progress)
            plan = latency.plan
        else:
            plan = allocate(config.factorization.allocation, prepared.shapes, budget, config.factorization.rank_multiple, energies, loss)
            plan = within_ceilings(plan, prepared.decompositions)
    factors = planned_factors(prepared.decompositions, plan)
    if config.factorization.refit:
        with timer.stage("refit"):
            layers = prepared.inspection.layers
            on_stage = timer.progress.steps("refitting", len(refit_stages(layers, factors, structured)))
            refit = refit_plan(prepared.inspection.model.proto, layers, RefitPlan(factors, structured),
                               prepared.samples.calib.select(slice(0, config.factorization.refit_samples)), prepared.feeds,
                               RefitSettings(config.factorization.refit_mode, threads=config.threads), on_stage)
            factors, structured = refit.factors, refit.cuts
    return ChosenFactors(plan=plan, factors=factors, structured=structured, latency=latency, shape_plan=shape_record)


def within_ceilings(plan: RankPlan, decompositions: dict[str, Decomposition]) -> RankPlan:
    """`plan` with no rank above what its layer's decomposition holds. The ceilings come from a uniform plan over
    every eligible layer; when calibration then keeps some dense (too few positions), the uniform plan over the rest
    may hand a layer a multiple or two more, which it does not get (the budget is only under-spent)."""
    return {name: rank if rank is None else min(rank, getattr(decompositions.get(name), "max_rank", rank))
            for name, rank in plan.items()}


class Finetuner(Protocol):
    """Turns the chosen factors into a fine-tuned compressed model (e.g. `lrdeploy distill`'s distillation)."""

    def __call__(self, prepared: PreparedBuild, chosen: ChosenFactors) -> tuple[onnx.ModelProto, FinetuneRecord]:
        """The compressed model with the factors trained further, and a report record of the training."""


def realize_build(prepared: PreparedBuild, budget: float, output_dir: Path, progress: Progress = SILENT,
                  bench: bool | None = None, finetune: Finetuner | None = None,
                  published_dir: Path | None = None, last: bool = False) -> BuildResult:
    """Allocate ranks for `budget`, rewrite (or fine-tune), save, validate (and bench, by default when the config
    says so); write the model and reports into `output_dir` together, or nothing at all. `published_dir`: where a
    caller that staged `output_dir` will publish these files (what the reports name; default `output_dir`).
    `last`: no other budget is realized from `prepared`, whose decompositions are freed once the model is written
    (validation then holds both models' sessions, and nothing else of the model's size)."""
    config, inspection = prepared.config, prepared.inspection
    timer = StageTimer(progress, prepared.timings, prepared.peaks)
    output_dir = Path(output_dir)
    output_model = output_dir / config.output_model.name
    published_model = Path(published_dir or output_dir) / output_model.name
    refuse_overwriting_inputs(output_files(published_model), input_files(config, inspection.model))
    chosen = choose_factors(prepared, budget, timer)
    finetune_record = None
    if finetune is not None:
        with timer.stage("finetune"):
            proto, finetune_record = finetune(prepared, chosen)
    with output_set(output_dir) as stage:
        staged_model = stage / output_model.name
        with timer.stage("rewrite"):
            written_out = finetune is None and inspection.model.weights is not None
            if finetune is None:
                data_file = stage / external_data_name(staged_model)
                proto = compressed_model(inspection.model.proto, prepared.eligible, chosen.factors, chosen.structured,
                                         partial(_written_out, prepared, chosen, data_file, last) if written_out else None)
            record_metadata(proto, inspection.model.proto, config, budget, chosen.plan, finetune_record)
            model_after, matrices_after = count_parameters(proto), matrix_elements(proto)
            fused_ops = {"dense": fused_op_counts(inspection.model.proto), "compressed": fused_op_counts(proto)}
            if written_out:
                external = _save_written_out(proto, staged_model, data_file, inspection.model.external_data)
            else:
                external = save_model(proto, staged_model, external_data=inspection.model.external_data)
            del proto
            chosen.factors.clear()
            if last:
                prepared.decompositions.clear()
            check_model(staged_model)
        with timer.stage("validate"):
            accuracy = compare_models(config.model, staged_model, prepared.feeds.batches(prepared.samples.eval),
                                      config.validation.atol, config.validation.rtol, config.validation.neighbours, prepared.feeds.mask_name)
        latency_bench = None
        if config.validation.bench if bench is None else bench:
            with timer.stage("bench"):
                latency_bench = run_bench(BenchConfig([str(config.model), str(staged_model)], "ort-cpu",
                                                      batches=config.validation.bench_batches, seq=config.validation.bench_seq,
                                                      settings=BenchSettings(iterations=config.validation.bench_iterations),
                                                      threads=config.threads))
                write_bench(latency_bench, stage, f"lrdeploy bench {config.model} {published_model} --backend ort-cpu")
        outcome = BuildOutcome(
            budget=budget, plan=chosen.plan, latency=chosen.latency, output_model=str(published_model),
            external_data=external, model_params_after=model_after, accuracy=accuracy,
            bench=latency_bench, finetune=finetune_record,
            timings=timer.timings, peaks=timer.peaks, fused_ops=fused_ops,
            latency_plan=chosen.shape_plan if chosen.latency is None else chosen.latency.record(prepared.shapes),
            structured=chosen.structured)
        report = assemble_report(prepared, outcome)
        check_claimed_changes(matrix_elements(inspection.model.proto), matrices_after, report.layers)
        write_reports(report, stage)
    return BuildResult(report, output_model, *(output_dir / name for name in REPORT_FILES))


def _written_out(prepared: PreparedBuild, chosen: ChosenFactors, data_file: Path, last: bool, graph: gs.Graph) -> None:
    """The rewritten graph's weights written to the output's data file before export (`weights_out`), for a model
    loaded with its weights mapped: with `last`, the decompositions are let go first, so that each layer's leave
    memory as its factors are written (the graph's constants hold their only views)."""
    if last:
        chosen.factors.clear()
        prepared.decompositions.clear()
    write_constants_out(graph, data_file, prepared.inspection.model.weights)


def _save_written_out(proto: onnx.ModelProto, path: Path, data_file: Path, external: bool) -> bool:
    """Save a proto whose weights `_written_out` put in `data_file`: as its references, or, when the input was one
    file (`external` False), in one file too (its weights read back in, the data file removed). Whether the
    weights stay external."""
    if not external:
        external_data_helper.load_external_data_for_model(proto, str(data_file.parent))
        data_file.unlink()
        return save_model(proto, path)
    save_model(proto, path)
    return True


def build(config: BuildConfig, progress: Progress = SILENT) -> BuildResult:
    """Compress `config.model` under `config.factorization.rank_budget`; write the model and reports. The output folder is
    held from the first step (after the options are checked), so a busy one is refused before any work."""
    with held_output_dir(config):
        return realize_build(prepare_build(config, progress), config.factorization.rank_budget,
                             config.resolved_output_dir, progress, last=True)


@contextmanager
def held_output_dir(config: BuildConfig) -> Iterator[None]:
    """Check the options and the output folder, then hold the folder for the whole run (`build`, `sweep`): a busy
    one is refused before any work."""
    config.check()
    check_output_dir(config.resolved_output_dir)
    with output_lock(config.resolved_output_dir):
        yield
