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
from typing import Iterator

import onnx
import onnx_graphsurgeon as gs

from lrdeploy import __version__
from lrdeploy.bench.report import BuildConfigRecord, BuildReport, LayerRecord, ParamSummary, write_reports
from lrdeploy.calib.data import detect_mask_input, iter_batches, model_input_specs
from lrdeploy.calib.stats import TensorRequest
from lrdeploy.errors import BudgetError, NoEligibleLayersError, OutputError
from lrdeploy.files import prepare_output_dir
from lrdeploy.lowrank.allocate import RankPlan, allocate, check_budget, realized_ratio
from lrdeploy.lowrank.decompose import METHODS, Decomposition, decompose
from lrdeploy.onnx_io import check_model, count_parameters, save_model
from lrdeploy.passes.factorize import factorize_layers
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.bench.bench_report import write_bench
from lrdeploy.pipeline.bench import BenchConfig, run_bench
from lrdeploy.pipeline.calibrate import calibrate
from lrdeploy.pipeline.config import BuildConfig
from lrdeploy.pipeline.inspect import Inspection, inspect_model
from lrdeploy.pipeline.latency import LatencyPlan, latency_aware_plan
from lrdeploy.pipeline.samples import prepare_samples
from lrdeploy.pipeline.validate import compare_models


@dataclass
class BuildResult:
    report: BuildReport
    output_model: Path
    report_json: Path
    report_md: Path


class _Stages:
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


def _record_metadata(proto: onnx.ModelProto, original: onnx.ModelProto, config: BuildConfig, plan: RankPlan) -> None:
    entries = {p.key: p.value for p in original.metadata_props}
    entries.update({
        "lrdeploy.version": __version__,
        "lrdeploy.rank_budget": str(config.rank_budget),
        "lrdeploy.method": config.method,
        "lrdeploy.allocation": config.allocation,
        "lrdeploy.rank_multiple": str(config.rank_multiple),
        "lrdeploy.ranks": json.dumps(plan),
    })
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


def build(config: BuildConfig, console=None) -> BuildResult:
    """Compress `config.model` under `config.rank_budget`; write the model and reports."""
    _check_config(config)
    stages = _Stages(console)
    with stages.stage("load"):
        inspection = inspect_model(config.model, config.rank_multiple)
        eligible = _require_eligible(inspection)
        shapes = [layer.shape for layer in eligible]
        check_budget(shapes, config.rank_budget, config.rank_multiple)  # before any expensive work
        output_dir = prepare_output_dir(config.resolved_output_dir)
        output_model = config.output_model
        if output_model.resolve() == Path(config.model).resolve():
            raise OutputError(f"output {output_model} would overwrite the input model; choose another -o/--output-dir")
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
    latency = None
    with stages.stage("allocate"):
        energies = {name: d.energies for name, d in decompositions.items()}
        if config.latency_aware:
            latency = latency_aware_plan(config.allocation, shapes, config.rank_budget, config.rank_multiple, energies,
                                         config.latency_tokens, config.latency_device, config.threads)
            plan = latency.plan
        else:
            plan = allocate(config.allocation, shapes, config.rank_budget, config.rank_multiple, energies)
    with stages.stage("rewrite"):
        factors = {name: decompositions[name].factors(rank) for name, rank in plan.items() if rank is not None}
        factorize_layers(inspection.graph, inspection.layers, factors)
        proto = gs.export_onnx(inspection.graph)
        _record_metadata(proto, inspection.model.proto, config, plan)
        model_after = count_parameters(proto)
        external = save_model(proto, output_model, external_data=inspection.model.external_data)
        del proto
        check_model(output_model)
    with stages.stage("validate"):
        feeds = iter_batches(samples.eval, specs, config.batch_size, mask_name)
        accuracy = compare_models(config.model, output_model, feeds, config.atol, config.rtol)
    bench = None
    if config.bench:
        with stages.stage("bench"):
            bench = run_bench(BenchConfig([str(config.model), str(output_model)], "ort-cpu", config.bench_batches,
                                          config.bench_seq, threads=config.threads))
            write_bench(bench, output_dir, f"lrdeploy bench {config.model} {output_model} --backend ort-cpu")

    linear_before = sum(s.dense_params for s in shapes)
    ratio = realized_ratio(shapes, plan)
    report = BuildReport(
        lrdeploy_version=__version__,
        input_model=str(config.model),
        output_model=str(output_model),
        external_data=external,
        config=BuildConfigRecord(config.rank_budget, config.method, config.allocation, config.rank_multiple,
                                 samples.calib.count, samples.calib_source, samples.eval_source),
        layers=_layer_records(inspection.layers, plan, latency),
        params=ParamSummary(linear_before, round(ratio * linear_before), ratio, inspection.model_params, model_after,
                            model_after / max(inspection.model_params, 1)),
        accuracy=accuracy,
        timings=stages.timings,
        warnings=samples.warnings,
        bench=None if bench is None else dataclasses.asdict(bench),
    )
    json_path, md_path = write_reports(report, output_dir)
    return BuildResult(report, output_model, json_path, md_path)
