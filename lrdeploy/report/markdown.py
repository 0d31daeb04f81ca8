"""Markdown renderings: report.md of a build, bench.md of a benchmark, sweep.md of a sweep."""

from __future__ import annotations

from lrdeploy.bench.measure import BenchResult
from lrdeploy.report.plan_records import LatencyPlanRecord, ShapePlanRecord
from lrdeploy.report.model import BuildReport, SweepReport, sweep_table, target_sign


def cell(text: object) -> str:
    """Text safe inside a Markdown table cell: a newline or a pipe in a name would break the row."""
    return " ".join(str(text).splitlines()).replace("|", "\\|")


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
        lines[-1:-1] = [f"- fine-tuned by label-free distillation: {f.summary()}"]
    if report.warnings:
        lines += ["## Warnings", ""] + [f"- {w}" for w in report.warnings] + [""]
    task = report.accuracy.task_table() if report.accuracy is not None else None
    if task is not None:
        title, headers, cells = task
        lines += [f"## {cell(title)}", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
                  "| " + " | ".join(cells) + " |", ""]
    if report.generated:
        lines += ["## Generated text (greedy, both models)", "", "| prompt | dense | compressed |", "|---|---|---|"]
        lines += [f"| {cell(g.prompt)} | {cell(g.dense)} | {cell(g.compressed)} |" for g in report.generated] + [""]
    if report.accuracy is not None:
        a = report.accuracy
        lines += [
            f"## Accuracy on {a.samples} held-out samples",
            "",
            f"| output | cosine mean | cosine p5 | rel. L2 | max abs | top-{a.neighbours} neighbours |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {cell(name)} | {o.cosine_mean:.4f} | {o.cosine_p5:.4f} | {o.rel_l2:.4f} | {o.max_abs:.4g} | "
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
        f"| {cell(l.name)} | {cell(l.pattern)} | {l.d_in} | {l.d_out} | {'' if l.rank is None else l.rank} | "
        f"{l.params_before:,} | {l.params_after:,} | {l.status} | {_speedup(l.predicted_speedup)} | "
        f"{_speedup(l.measured_speedup)} | {cell(l.reason)} |"
        for l in report.layers
    ]
    lines += plan_markdown(report.latency_plan)
    if report.bench is not None:
        lines += ["## Latency", ""] + bench_markdown(report.bench).splitlines()[2:] + [""]
    lines += ["", "## Timings and memory", "", "| stage | seconds | peak RSS (MB) |", "|---|---|---|"]
    lines += [f"| {stage} | {seconds:.2f} | {report.peak_rss_mb.get(stage, '')} |"
              for stage, seconds in report.timings.items()]
    return "\n".join(lines) + "\n"


def plan_markdown(plan: LatencyPlanRecord | None) -> list[str]:
    """The plan's section: what it planned for, its predicted ratio next to the one measured here, and every
    plan tried on the way (`--target-latency` measured here plans again until the clock meets the target)."""
    if not isinstance(plan, ShapePlanRecord):  # --latency-aware plans are summarised in the layer table
        return []
    cuts = f"cuts: {', '.join(plan.choices) or 'none'}"
    if plan.resource == "params":
        return ["## Plan", "", f"- {plan.plan} plan under the parameter budget: ×{plan.predicted_ratio:.3f} of the "
                f"linear parameters; {cuts}", ""]
    measured = plan.measured_ratio
    lines = ["## Plan", "",
             f"- {plan.plan} plan for ×{plan.target_latency} of dense latency at {plan.tokens} tokens "
             f"({plan.scope}, {plan.source}): predicted ×{plan.predicted_ratio:.3f}, measured "
             + ("not here (a device profile's plan)" if measured is None else f"×{measured:.3f}"),
             f"- {cuts}", ""]
    attempts = plan.attempts
    if len(attempts) > 1 or any(len(attempt.by_tokens) > 1 for attempt in attempts):
        lines += ["| planned for | predicted | measured (worst) | by tokens | predicted distortion |",
                  "|---|---|---|---|---|"]
        lines += [f"| ×{a.planned_for:.3f} | ×{a.predicted:.3f} | ×{a.measured:.3f} | "
                  + ", ".join(f"{tokens}: ×{ratio:.3f}" for tokens, ratio in a.by_tokens.items())
                  + f" | {a.distortion:.4f} |" for a in attempts] + [""]
    return lines


def bench_markdown(result: BenchResult) -> str:
    lines = [
        f"# lrdeploy bench: {', '.join(result.models)}",
        "",
        f"backend {result.backend}, precision {result.precision}, device {result.device}, "
        + ", ".join(f"{k} {v}" for k, v in result.versions.items())
        + ("; every model as ONNX Runtime's transformer optimizer fuses it ("
           + "; ".join(f"{cell(m)}: " + (", ".join(f"{n} {op}" for op, n in ops.items()) or "no fused op")
                       for m, ops in result.fused_ops.items()) + ")" if result.optimize == "ort" else ""),
        "",
        "| model | batch × seq | mean ms | p50 ms | p90 ms | p95 ms | p99 ms | inferences/s | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in result.shapes:
        for name, s in shape.latency.items():
            lines.append(f"| {cell(name)} | {shape.label} | {s.mean_ms:.2f} | {s.p50_ms:.2f} | {s.p90_ms:.2f} | "
                         f"{s.p95_ms:.2f} | {s.p99_ms:.2f} | {s.inferences_per_s:.1f} | {s.tokens_per_s:.0f} |")
    ratios = [s for s in result.shapes if s.ratio_p50 is not None]
    if ratios:
        lines += ["", f"Latency ratio {result.models[1]} / {result.models[0]} (runs alternated):", "",
                  "| batch × seq | p50 ratio | mean ratio |", "|---|---|---|"]
        lines += [f"| {s.label} | {s.ratio_p50:.3f} | {s.ratio_mean:.3f} |" for s in ratios]
    return "\n".join(lines) + "\n"


def sweep_markdown(report: SweepReport) -> str:
    headers, rows = sweep_table(report.points)
    lines = [f"# lrdeploy sweep: {report.model}", "", f"output `{report.output}`", "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell(value) for value in row) + " |" for row in rows]
    if report.target is not None:
        lines += ["", f"Target {report.metric} {target_sign(report.metric)} {report.target}: " + (
            f"smallest budget meeting it ρ={report.chosen:.3f}" if report.chosen is not None else "not met")]
    return "\n".join(lines) + "\n"
