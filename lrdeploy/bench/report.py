"""The build report: a dataclass tree rendered as report.json (stable schema) and report.md.

report.json schema (all keys always present):
    lrdeploy_version, input_model, output_model, external_data,
    config {rank_budget, method, allocation, rank_multiple, calib_samples, calib_source, eval_source, refit},
    layers [{name, pattern, d_in, d_out, rank|null, params_before, params_after, status, reason,
             predicted_speedup|null, measured_speedup|null}],
    params {linear_before, linear_after, linear_ratio, model_before, model_after, model_ratio},
    accuracy {samples, passed, atol, rtol, neighbours,
              outputs {NAME: {cosine_mean, cosine_p5, rel_l2, max_abs, topk_agreement|null}}},
    timings {stage: seconds}, warnings [str], bench (see bench.json) | null,
    spectra {layer: {weight: [σ² descending], feature: [output eigenvalues descending]}},
    finetune {steps, lr, hidden_weight, freeze_embeddings, train_samples, initial_cosine, best_cosine, best_step,
              history [{step, eval_cosine, train_loss?}]} | null   (label-free distillation, `lrdeploy distill`)
Parameters count weights only (biases excluded), so linear_ratio is what --rank-budget bounds.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from lrdeploy.files import atomic_write_text


@dataclass
class LayerRecord:
    name: str
    pattern: str
    d_in: int
    d_out: int
    rank: int | None
    params_before: int
    params_after: int
    status: str  # "factorized" | "dense" | "skipped"
    reason: str
    predicted_speedup: float | None = None  # dense FLOPs / split FLOPs
    measured_speedup: float | None = None  # dense time / split time (with --latency-aware)


@dataclass
class ParamSummary:
    linear_before: int
    linear_after: int
    linear_ratio: float
    model_before: int
    model_after: int
    model_ratio: float


@dataclass
class OutputAccuracy:
    cosine_mean: float
    cosine_p5: float
    rel_l2: float
    max_abs: float
    topk_agreement: float | None = None  # per-sample vector outputs: nearest-neighbour agreement


@dataclass
class AccuracyReport:
    samples: int
    passed: bool
    atol: float
    rtol: float
    outputs: dict[str, OutputAccuracy]
    neighbours: int = 10


@dataclass
class BuildConfigRecord:
    rank_budget: float
    method: str
    allocation: str
    rank_multiple: int
    calib_samples: int
    calib_source: str
    eval_source: str
    refit: bool = False


@dataclass
class BuildReport:
    lrdeploy_version: str
    input_model: str
    output_model: str
    external_data: bool
    config: BuildConfigRecord
    layers: list[LayerRecord]
    params: ParamSummary
    accuracy: AccuracyReport | None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    bench: dict | None = None  # BenchResult of dense vs compressed (with --bench)
    spectra: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # {layer: {weight, feature}}
    finetune: dict | None = None  # FinetuneRecord-shaped dict when the factors were fine-tuned by distillation

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _speedup(value: float | None) -> str:
    return "" if value is None else f"×{value:.2f}"


def render_markdown(report: BuildReport) -> str:
    """report.md: summary, accuracy and per-layer tables."""
    p, c = report.params, report.config
    lines = [
        "# lrdeploy build report",
        "",
        f"- input: `{report.input_model}`",
        f"- output: `{report.output_model}`",
        f"- method `{c.method}`, allocation `{c.allocation}`, rank budget {c.rank_budget}, rank multiple {c.rank_multiple}"
        + (", sequential refit" if c.refit else ""),
        f"- calibration: {c.calib_samples} samples from {c.calib_source}; evaluation: {c.eval_source}",
        f"- linear-layer parameters: {p.linear_before:,} → {p.linear_after:,} (ratio {p.linear_ratio:.3f})",
        f"- whole-model parameters: {p.model_before:,} → {p.model_after:,} (ratio {p.model_ratio:.3f})",
        "",
    ]
    if report.finetune is not None:
        f = report.finetune
        lines[-1:-1] = [f"- fine-tuned by label-free distillation: {f['steps']} steps on {f['train_samples']} samples, "
                        f"lr {f['lr']}, hidden-state weight {f['hidden_weight']}; cosine on the check split during training "
                        f"{f['initial_cosine']:.4f} → {f['best_cosine']:.4f} (best at step {f['best_step']})"]
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    if report.accuracy is not None:
        a = report.accuracy
        lines += [
            f"## Accuracy on {a.samples} held-out samples",
            "",
            f"| output | cosine mean | cosine p5 | rel. L2 | max abs | top-{a.neighbours} neighbours |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {name} | {o.cosine_mean:.4f} | {o.cosine_p5:.4f} | {o.rel_l2:.4f} | {o.max_abs:.4g} | "
            f"{'' if o.topk_agreement is None else f'{o.topk_agreement:.3f}'} |"
            for name, o in a.outputs.items()
        ]
        lines += ["", f"Polygraphy comparison (atol {a.atol}, rtol {a.rtol}): {'passed' if a.passed else 'failed'}", ""]
    lines += [
        "## Layers",
        "",
        "| layer | pattern | d_in | d_out | rank | params before | params after | status | FLOP speed-up "
        "| measured speed-up | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {l.name} | {l.pattern} | {l.d_in} | {l.d_out} | {'' if l.rank is None else l.rank} | "
        f"{l.params_before:,} | {l.params_after:,} | {l.status} | {_speedup(l.predicted_speedup)} | "
        f"{_speedup(l.measured_speedup)} | {l.reason} |"
        for l in report.layers
    ]
    if report.bench is not None:
        from lrdeploy.bench.bench_report import bench_markdown
        from lrdeploy.bench.measure import result_from_dict

        lines += ["## Latency", ""] + bench_markdown(result_from_dict(report.bench)).splitlines()[2:] + [""]
    lines += ["", "## Timings (s)", "", "| stage | seconds |", "|---|---|"]
    lines += [f"| {stage} | {seconds:.2f} |" for stage, seconds in report.timings.items()]
    return "\n".join(lines) + "\n"


def write_reports(report: BuildReport, directory: Path) -> tuple[Path, Path, Path]:
    """Write report.json, report.md and report.html into `directory` atomically; return their paths."""
    from lrdeploy.bench.html import render_build_html

    directory = Path(directory)
    json_path, md_path, html_path = directory / "report.json", directory / "report.md", directory / "report.html"
    atomic_write_text(json_path, json.dumps(report.to_dict(), indent=2) + "\n")
    atomic_write_text(md_path, render_markdown(report))
    atomic_write_text(html_path, render_build_html(report))
    return json_path, md_path, html_path
