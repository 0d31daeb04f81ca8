"""`lrdeploy build`: one compression run, top to bottom as in DESIGN §2.

    model.onnx ─inspect─► [LinearLayer] ─calibrate─► {input tensor: Moments}
    ─decompose─► spectra ─allocate─► RankPlan ─factorize─► model.lowrank.onnx
    ─validate (Polygraphy)─► AccuracyReport [─bench─► LatencyReport] ─► report.json, report.md

Every user error surfaces as an LrdeployError before the first output file is written; outputs are
written atomically and never over the input.
"""

from __future__ import annotations

import dataclasses
import json
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from lrdeploy import __version__
from lrdeploy.bench.bench_report import write_bench
from lrdeploy.bench.measure import BenchSettings
from lrdeploy.bench.report import BuildConfigRecord, BuildReport, LayerRecord, ParamSummary, write_reports
from lrdeploy.calib.data import detect_mask_input, iter_batches, model_input_specs
from lrdeploy.calib.stats import TensorRequest
from lrdeploy.errors import BudgetError, NoEligibleLayersError, OutputError
from lrdeploy.files import prepare_output_dir
from lrdeploy.lowrank.allocate import ALLOCATIONS, LayerShape, RankPlan, allocate, check_budget, realized_ratio
from lrdeploy.lowrank.decompose import METHODS, Decomposition, LowRankFactors, decompose
from lrdeploy.lowrank.moments import Moments
from lrdeploy.onnx_io import check_model, count_parameters, save_model
from lrdeploy.passes.factorize import factorize_layers
from lrdeploy.passes.linear_layers import LinearLayer, find_linear_layers
from lrdeploy.pipeline.bench import BenchConfig, run_bench
from lrdeploy.pipeline.calibrate import cache_key, calibrate, load_sensitivity, store_sensitivity
from lrdeploy.pipeline.config import BuildConfig
from lrdeploy.pipeline.inspect import Inspection, inspect_model
from lrdeploy.pipeline.latency import LatencyPlan, latency_aware_plan
from lrdeploy.pipeline.refit import refit_factors, refit_stages
from lrdeploy.pipeline.samples import BuildSamples, prepare_samples
from lrdeploy.pipeline.sensitivity import (
    SensitivityTable,
    count_measurements,
    measure_sensitivity,
    sensitivity_loss,
)
from lrdeploy.pipeline.validate import compare_models


@dataclass
class BuildResult:
    report: BuildReport
    output_model: Path
    report_json: Path
    report_md: Path
    report_html: Path


class StageTimer:
    """Times each stage and, with a rich console, says what is happening."""

    def __init__(self, console=None):
        self.console = console
        self.timings: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.timings[name] = round(time.perf_counter() - start, 3)
        if self.console is not None:
            self.console.print(f"[green]✓[/green] {name} ({self.timings[name]:.1f} s)")

    def progress(self, description: str):
        """A factory `total -> advance()` that drives a rich progress bar (or nothing without a console)."""
        if self.console is None:
            return None
        from rich.progress import Progress

        def start(total: int):
            bar = Progress(console=self.console, transient=True)
            bar.start()
            task = bar.add_task(description, total=total)

            def advance() -> None:
                bar.advance(task)
                if bar.finished:
                    bar.stop()

            return advance

        return start


def _check_config(config: BuildConfig) -> None:
    if not 0.0 < config.rank_budget <= 1.0:
        raise BudgetError(f"rank budget {config.rank_budget} is outside (0, 1]; pass e.g. --rank-budget 0.5")
    if config.allocation not in ALLOCATIONS:
        raise BudgetError(f"unknown allocation {config.allocation!r}; choose one of {', '.join(ALLOCATIONS)}")
    if config.method not in METHODS:
        raise BudgetError(f"unknown method {config.method!r}; choose one of {', '.join(METHODS)}")
    if config.rank_multiple < 1:
        raise BudgetError(f"--rank-multiple {config.rank_multiple} must be at least 1; 16 or 64 suit tensor cores")


def _require_eligible(inspection: Inspection) -> list[LinearLayer]:
    eligible = inspection.eligible
    if not eligible:
        reasons = sorted({layer.reason for layer in inspection.layers})
        found = f"{len(inspection.layers)} MatMul/Gemm found, all skipped: {'; '.join(reasons)}" if reasons else "no MatMul/Gemm found"
        raise NoEligibleLayersError(
            f"{inspection.model.path} has no linear layer to compress ({found}); "
            "run `lrdeploy inspect` on it, or lower --rank-multiple for small layers"
        )
    return eligible


def _layer_records(layers: list[LinearLayer], plan: RankPlan, latency: LatencyPlan | None) -> list[LayerRecord]:
    records = []
    for layer in layers:
        if not layer.eligible:
            records.append(LayerRecord(layer.name, layer.pattern, layer.d_in, layer.d_out, None, layer.params,
                                       layer.params, "skipped", layer.reason))
            continue
        rank = plan[layer.name]
        if rank is None:
            slower = latency.slower.get(layer.name) if latency else None
            reason = ("the allocated rank would not save parameters" if slower is None
                      else f"kept dense: its split measured ×{slower:.2f} of dense speed")
            records.append(LayerRecord(layer.name, layer.pattern, layer.d_in, layer.d_out, None, layer.params,
                                       layer.params, "dense", reason))
        else:
            records.append(LayerRecord(
                layer.name, layer.pattern, layer.d_in, layer.d_out, rank, layer.params,
                layer.shape.factored_params(rank), "factorized", "",
                predicted_speedup=layer.params / layer.shape.factored_params(rank),
                measured_speedup=latency.measured_speedup(layer.shape, rank) if latency else None,
            ))
    return records


def _record_metadata(proto: onnx.ModelProto, original: onnx.ModelProto, config: BuildConfig, budget: float,
                     plan: RankPlan, finetune: dict | None) -> None:
    entries = {p.key: p.value for p in original.metadata_props}
    entries.update({
        "lrdeploy.version": __version__,
        "lrdeploy.rank_budget": str(budget),
        "lrdeploy.method": config.method,
        "lrdeploy.allocation": config.allocation,
        "lrdeploy.rank_multiple": str(config.rank_multiple),
        "lrdeploy.ranks": json.dumps(plan),
        "lrdeploy.refit": str(config.refit).lower(),
        **({} if finetune is None else {"lrdeploy.finetune_steps": str(finetune["steps"])}),
    })
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


SPECTRUM_LAYERS = 4


def _spectra(eligible: list[LinearLayer], moments: dict[str, Moments] | None) -> dict[str, dict[str, list[float]]]:
    """Weight singular values² beside output-feature eigenvalues for a few layers (first, widest, last):
    the picture of why features are low-rank while weights are not."""
    if moments is None:
        return {}
    picks = [eligible[0], max(eligible, key=lambda l: l.d_out), max(eligible, key=lambda l: l.d_in), eligible[-1]]
    chosen = list(dict.fromkeys(layer.name for layer in picks))[:SPECTRUM_LAYERS]
    by_name = {layer.name: layer for layer in eligible}
    spectra = {}
    for name in chosen:
        layer = by_name[name]
        weight = np.asarray(layer.weight, np.float64)
        features = moments[layer.input_name].through_linear(weight, layer.bias).covariance
        spectra[name] = {
            "weight": (np.linalg.svd(weight, compute_uv=False) ** 2).round(8).tolist(),
            "feature": np.clip(np.sort(np.linalg.eigvalsh(features))[::-1], 0, None).round(8).tolist(),
        }
    return spectra


def _sensitivity_table(config: BuildConfig, inspection: Inspection, eligible: list[LinearLayer],
                       decompositions: dict[str, Decomposition], samples: BuildSamples, specs: list,
                       mask_name: str | None, stages: StageTimer) -> SensitivityTable:
    """The sensitivity table from the cache, or measured on the first calibration samples (and cached)."""
    probe = samples.calib.select(slice(0, config.sensitivity_samples))
    cache_path = None
    if config.cache_dir is not None:
        model_files = [inspection.model.path, *inspection.model.external_files]
        key = cache_key(model_files, probe, f"{mask_name}|{config.method}|{config.rank_multiple}|sensitivity-v1")
        cache_path = Path(config.cache_dir) / f"{key}.sensitivity.json"
        cached = load_sensitivity(cache_path)
        if cached is not None and set(cached) == {layer.name for layer in eligible}:
            return cached
    progress = stages.progress("measuring sensitivity")
    table = measure_sensitivity(
        inspection.model.proto, eligible, decompositions, config.rank_multiple,
        iter_batches(probe, specs, config.batch_size, mask_name), config.threads,
        progress(count_measurements(eligible, config.rank_multiple)) if progress else None,
    )
    if cache_path is not None:
        store_sensitivity(cache_path, table)
    return table


@dataclass
class PreparedBuild:
    """Everything that does not depend on the budget: loaded model, samples, statistics, decompositions.

    A sweep prepares once and realizes many budgets from it.
    """

    config: BuildConfig
    inspection: Inspection
    eligible: list[LinearLayer]
    specs: list
    mask_name: str | None
    samples: BuildSamples
    decompositions: dict[str, Decomposition]
    spectra: dict[str, dict[str, list[float]]]
    stages: StageTimer
    console: object = None
    sensitivity: SensitivityTable | None = None

    @property
    def shapes(self) -> list[LayerShape]:
        return [layer.shape for layer in self.eligible]


def prepare_build(config: BuildConfig, console=None, budgets: tuple[float, ...] = (),
                  stages: StageTimer | None = None) -> PreparedBuild:
    """Load, check inputs, calibrate and decompose; every user error surfaces here, before outputs exist.
    `stages` continues a caller's timer (its earlier stages then appear in the report too)."""
    _check_config(config)
    stages = stages or StageTimer(console)
    with stages.stage("load"):
        inspection = inspect_model(config.model, config.rank_multiple)
        eligible = _require_eligible(inspection)
        for budget in budgets or (config.rank_budget,):
            check_budget([layer.shape for layer in eligible], budget, config.rank_multiple)
        prepare_output_dir(config.resolved_output_dir)
        if config.output_model.resolve() == Path(config.model).resolve():
            raise OutputError(f"output {config.output_model} would overwrite the input model; "
                              "choose another -o/--output-dir")
        specs = model_input_specs(inspection.model.proto)
        mask_name = detect_mask_input(specs, config.mask_input)
        samples = prepare_samples(config.calib, specs, config.shapes, config.calib_samples, config.eval,
                                  config.eval_samples, config.seed)
    if console is not None:
        for warning in samples.warnings:
            console.print(f"[yellow]Warning:[/yellow] {warning}")

    moments = None
    if config.method != "svd":
        with stages.stage("calibrate"):
            requests = [TensorRequest(layer.input_name, layer.d_in) for layer in eligible]
            model_files = [inspection.model.path, *inspection.model.external_files]
            moments, cached = calibrate(
                inspection.model.proto, model_files, requests, samples.calib, specs, config.batch_size, mask_name,
                config.cache_dir, config.threads, stages.progress("calibrating"),
            )
        if cached and console is not None:
            console.print("  (statistics from cache)")

    with stages.stage("decompose"):
        decompositions: dict[str, Decomposition] = {
            layer.name: decompose(config.method, layer.weight, layer.bias,
                                  None if moments is None else moments[layer.input_name])
            for layer in eligible
        }
        spectra = _spectra(eligible, moments)
    sensitivity = None
    if config.allocation == "sensitivity":
        with stages.stage("sensitivity"):
            sensitivity = _sensitivity_table(config, inspection, eligible, decompositions, samples, specs, mask_name,
                                             stages)
    return PreparedBuild(config, inspection, eligible, specs, mask_name, samples, decompositions, spectra, stages,
                         console, sensitivity)


def compressed_model(original: onnx.ModelProto, rank_multiple: int, factors: dict) -> onnx.ModelProto:
    """`original` with the layers named in `factors` split (a fresh graph each call; the original is kept)."""
    graph = gs.import_onnx(original)
    factorize_layers(graph, find_linear_layers(graph, rank_multiple), factors)
    return gs.export_onnx(graph)


@dataclass
class ChosenFactors:
    """What one budget turns a PreparedBuild into: the rank plan and the (optionally refit) factors per split."""

    plan: RankPlan
    factors: dict[str, LowRankFactors]
    latency: LatencyPlan | None = None


def choose_factors(prepared: PreparedBuild, budget: float, stages: StageTimer) -> ChosenFactors:
    """Allocate ranks for `budget` (latency-aware if configured) and refit the second factors if configured."""
    config = prepared.config
    latency = None
    with stages.stage("allocate"):
        energies = {name: d.energies for name, d in prepared.decompositions.items()}
        loss = None if prepared.sensitivity is None else sensitivity_loss(prepared.sensitivity, energies)
        if config.latency_aware:
            latency = latency_aware_plan(config.allocation, prepared.shapes, budget, config.rank_multiple, energies,
                                         config.latency_tokens, config.latency_device, config.threads, loss)
            plan = latency.plan
        else:
            plan = allocate(config.allocation, prepared.shapes, budget, config.rank_multiple, energies, loss)
    factors = {name: prepared.decompositions[name].factors(rank) for name, rank in plan.items() if rank is not None}
    if config.refit:
        with stages.stage("refit"):
            probe = prepared.samples.calib.select(slice(0, config.refit_samples))
            progress = stages.progress("refitting")
            factors = refit_factors(
                prepared.inspection.model.proto, prepared.eligible, factors,
                lambda chosen: compressed_model(prepared.inspection.model.proto, config.rank_multiple, chosen),
                lambda: iter_batches(probe, prepared.specs, config.batch_size, prepared.mask_name),
                prepared.mask_name, config.threads,
                on_stage=progress(len(refit_stages(prepared.eligible, factors))) if progress else None,
                mode=config.refit_mode,
            )
    return ChosenFactors(plan, factors, latency)


class Finetuner(Protocol):
    """Turns the chosen factors into a fine-tuned compressed model (e.g. `lrdeploy distill`'s distillation)."""

    def __call__(self, prepared: PreparedBuild, chosen: ChosenFactors) -> tuple[onnx.ModelProto, dict]:
        """The compressed model with the factors trained further, and a report record of the training."""


def realize_build(prepared: PreparedBuild, budget: float, output_dir: Path, bench: bool | None = None,
                  finetune: Finetuner | None = None) -> BuildResult:
    """Allocate ranks for `budget`, rewrite (or fine-tune), save, validate (and bench, by default when the config
    says so); write the model and reports."""
    config, inspection = prepared.config, prepared.inspection
    run_latency_bench = config.bench if bench is None else bench
    stages = StageTimer(prepared.console)
    stages.timings.update(prepared.stages.timings)
    output_dir = prepare_output_dir(output_dir)
    output_model = output_dir / config.output_model.name
    shapes = prepared.shapes
    chosen = choose_factors(prepared, budget, stages)
    plan, latency = chosen.plan, chosen.latency
    finetune_record = None
    if finetune is not None:
        with stages.stage("finetune"):
            proto, finetune_record = finetune(prepared, chosen)
    with stages.stage("rewrite"):
        if finetune is None:
            proto = compressed_model(inspection.model.proto, config.rank_multiple, chosen.factors)
        _record_metadata(proto, inspection.model.proto, config, budget, plan, finetune_record)
        model_after = count_parameters(proto)
        external = save_model(proto, output_model, external_data=inspection.model.external_data)
        del proto
        check_model(output_model)
    with stages.stage("validate"):
        feeds = iter_batches(prepared.samples.eval, prepared.specs, config.batch_size, prepared.mask_name)
        accuracy = compare_models(config.model, output_model, feeds, config.atol, config.rtol, config.neighbours)
    bench = None
    if run_latency_bench:
        with stages.stage("bench"):
            bench = run_bench(BenchConfig([str(config.model), str(output_model)], "ort-cpu", config.bench_batches,
                                          config.bench_seq, settings=BenchSettings(iterations=config.bench_iterations),
                                          threads=config.threads))
            write_bench(bench, output_dir, f"lrdeploy bench {config.model} {output_model} --backend ort-cpu")

    linear_before = sum(s.dense_params for s in shapes)
    ratio = realized_ratio(shapes, plan)
    samples = prepared.samples
    report = BuildReport(
        lrdeploy_version=__version__,
        input_model=str(config.model),
        output_model=str(output_model),
        external_data=external,
        config=BuildConfigRecord(budget, config.method, config.allocation, config.rank_multiple,
                                 samples.calib.count, samples.calib_source, samples.eval_source, config.refit),
        layers=_layer_records(inspection.layers, plan, latency),
        params=ParamSummary(linear_before, round(ratio * linear_before), ratio, inspection.model_params, model_after,
                            model_after / max(inspection.model_params, 1)),
        accuracy=accuracy,
        timings=stages.timings,
        warnings=samples.warnings,
        bench=None if bench is None else dataclasses.asdict(bench),
        spectra=prepared.spectra,
        finetune=finetune_record,
    )
    paths = write_reports(report, output_dir)
    return BuildResult(report, output_model, *paths)


def build(config: BuildConfig, console=None) -> BuildResult:
    """Compress `config.model` under `config.rank_budget`; write the model and reports."""
    return realize_build(prepare_build(config, console), config.rank_budget, config.resolved_output_dir)
