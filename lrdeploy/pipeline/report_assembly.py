"""Turn what a build did into its records: the report tree, the model's metadata, the spectra plot's data."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Protocol

import onnx

from lrdeploy import __version__
from lrdeploy.bench.measure import BenchResult
from lrdeploy.lowrank.allocate import LayerShape, RankPlan, realized_ratio
from lrdeploy.passes.linear_layers import LinearLayer
from lrdeploy.settings.build import BuildConfig
from lrdeploy.stages.inspect import Inspection
from lrdeploy.planning.latency_aware import LatencyPlan
from lrdeploy.report.plan_records import LatencyPlanRecord
from lrdeploy.stages.samples import BuildSamples
from lrdeploy.passes.compose import StructuredCuts
from lrdeploy.report.model import (AccuracyReport, BuildConfigRecord, BuildReport, FinetuneRecord, LayerRecord,
                                   ParamSummary)

class PreparedInputs(Protocol):
    """What a report needs of a `build.PreparedBuild` (named by shape here, as build imports this module)."""

    config: BuildConfig
    inspection: Inspection
    samples: BuildSamples
    spectra: dict[str, dict[str, list[float]]]

    @property
    def shapes(self) -> list[LayerShape]: ...


def record_metadata(proto: onnx.ModelProto, original: onnx.ModelProto, config: BuildConfig, budget: float,
                    plan: RankPlan, finetune: FinetuneRecord | None) -> None:
    """`proto`'s metadata_props: the original's, plus what lrdeploy did (version, budget, method, ranks, ...)."""
    entries = {p.key: p.value for p in original.metadata_props}
    entries.update({
        "lrdeploy.version": __version__,
        "lrdeploy.rank_budget": str(budget),
        "lrdeploy.method": config.factorization.method,
        "lrdeploy.allocation": config.factorization.allocation,
        "lrdeploy.rank_multiple": str(config.factorization.rank_multiple),
        "lrdeploy.ranks": json.dumps(plan),
        "lrdeploy.refit": str(config.factorization.refit).lower(),
        "lrdeploy.optimize": config.optimize,
        "lrdeploy.qkv": config.qkv_form,
        **({} if config.cuts.ffn_keep is None else {"lrdeploy.ffn_keep": str(config.cuts.ffn_keep)}),
        **({} if config.cuts.heads_keep is None else {"lrdeploy.heads_keep": str(config.cuts.heads_keep)}),
        **({} if config.cuts.values_keep is None else {"lrdeploy.values_keep": str(config.cuts.values_keep)}),
        **({} if not config.cuts.drop_blocks else {"lrdeploy.drop_blocks": str(config.cuts.drop_blocks)}),
        **({} if finetune is None else {"lrdeploy.finetune_steps": str(finetune.steps)}),
    })
    del proto.metadata_props[:]
    for key, value in entries.items():
        proto.metadata_props.add(key=key, value=value)


def layer_records(layers: list[LinearLayer], plan: RankPlan, latency: LatencyPlan | None,
                  narrowed: dict[str, tuple[str, int]]) -> list[LayerRecord]:
    """One record per linear layer found: factorized at its rank, narrowed, kept dense (and why), or skipped."""
    records = []
    for layer in layers:
        if layer.name in narrowed:
            why, after = narrowed[layer.name]
            status = "dropped" if "dropped" in why else "narrowed"
            records.append(LayerRecord(layer.name, layer.pattern, layer.d_in, layer.d_out, None, layer.params, after,
                                       status, why))
            continue
        if not layer.eligible:
            records.append(LayerRecord(layer.name, layer.pattern, layer.d_in, layer.d_out, None, layer.params,
                                       layer.params, "skipped", layer.reason))
            continue
        if layer.name not in plan:  # eligible, but outside the layers this build may split (BuildConfig.splits)
            records.append(LayerRecord(layer.name, layer.pattern, layer.d_in, layer.d_out, None, layer.params,
                                       layer.params, "dense", "kept dense: only FFN layers are split, so the student "
                                       "fused again keeps ONNX Runtime's Attention fusion"))
            continue
        rank = plan[layer.name]
        if rank is None:
            slower = latency.slower.get(layer.name) if latency else None
            reason = ("the allocated rank would not save parameters" if slower is None
                      else f"kept dense: {latency.source} has no timing of this shape and rank" if slower == 0
                      else f"kept dense: its split runs at ×{slower:.2f} of dense speed at {latency.tokens} tokens "
                           f"({latency.source})")
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


@dataclass(kw_only=True)
class BuildOutcome:
    """What one budget's build produced, for the report."""

    budget: float
    plan: RankPlan
    latency: LatencyPlan | None
    output_model: str
    external_data: bool
    model_params_after: int
    accuracy: AccuracyReport | None
    bench: BenchResult | None
    finetune: FinetuneRecord | None
    timings: dict[str, float]
    peaks: dict[str, float]
    fused_ops: dict[str, dict[str, int]]
    latency_plan: LatencyPlanRecord | None
    structured: StructuredCuts


def assemble_report(prepared: PreparedInputs, outcome: BuildOutcome) -> BuildReport:
    """The report tree of one build (report.json's schema: `report.model`). Linear-layer parameters count the
    low-rank candidates under the plan and the narrowed FFN layers at their new width."""
    config, inspection, samples = prepared.config, prepared.inspection, prepared.samples
    narrowed = outcome.structured.records()
    shapes = [shape for shape in prepared.shapes if shape.name not in narrowed]  # a unified plan cuts candidates
    narrowed_before = sum(layer.params for layer in inspection.layers if layer.name in narrowed)
    linear_before = sum(s.dense_params for s in shapes) + narrowed_before
    linear_after = (realized_ratio(shapes, outcome.plan) * sum(s.dense_params for s in shapes)
                    + sum(after for _, after in narrowed.values()))
    model_params = inspection.model_params
    return BuildReport(
        lrdeploy_version=__version__,
        input_model=str(config.reported_model or config.model),
        output_model=outcome.output_model,
        external_data=outcome.external_data,
        config=BuildConfigRecord(rank_budget=outcome.budget, method=config.factorization.method, allocation=config.factorization.allocation,
                                 rank_multiple=config.factorization.rank_multiple, calib_samples=samples.calib.count,
                                 calib_source=samples.calib_source, eval_source=samples.eval_source,
                                 refit=config.factorization.refit, optimize=config.optimize, ffn_keep=config.cuts.ffn_keep,
                                 heads_keep=config.cuts.heads_keep, drop_blocks=config.cuts.drop_blocks, qkv=config.qkv_form,
                                 values_keep=config.cuts.values_keep),
        layers=layer_records(inspection.layers, outcome.plan, outcome.latency, narrowed),
        params=ParamSummary(linear_before, round(linear_after), linear_after / linear_before, model_params,
                            outcome.model_params_after, outcome.model_params_after / max(model_params, 1)),
        accuracy=outcome.accuracy,
        timings=outcome.timings,
        peak_rss_mb=outcome.peaks,
        warnings=samples.warnings,
        bench=outcome.bench,
        spectra=prepared.spectra,
        finetune=outcome.finetune,
        fused_ops=outcome.fused_ops,
        latency_plan=outcome.latency_plan,
    )
