"""report.html: one self-contained page (inline CSS, plots as embedded PNG, no network references)."""

from __future__ import annotations

import base64
import html

from lrdeploy.report.model import BuildReport, SweepReport, sweep_table, target_sign
from lrdeploy.report.plots import (MANY_LAYERS, budget_plot, distillation_plot, kept_heatmap, latency_plot, pareto_plot,
                                   ranks_plot, spectra_plot)

STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;
color:#222;padding:0 1rem}h1{margin-bottom:.2rem}h2{margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.2rem}
.sub{color:#666;margin-top:0}.cards{display:flex;gap:1rem;flex-wrap:wrap;margin:1rem 0}
.card{border:1px solid #ddd;border-radius:8px;padding:.8rem 1.2rem;min-width:180px}
.card .v{font-size:1.8rem;font-weight:600}.card .l{color:#666;font-size:.85rem}
table{border-collapse:collapse;font-size:.8rem;margin:.5rem 0}th,td{border:1px solid #ddd;padding:.2rem .45rem;
text-align:right;vertical-align:top}th{background:#f5f5f5}td.t,th.t{text-align:left}td.t{overflow-wrap:anywhere}
img{max-width:100%;height:auto}
.fig{margin:1rem 0}.row{display:flex;gap:1rem;flex-wrap:wrap}.row .fig{flex:1 1 460px}.cap{color:#666;font-size:.85rem}.warn{color:#8a5a00}
"""


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _figure(png: bytes, alt: str, caption: str) -> str:
    return f'<div class="fig">{_img(png, alt)}<div class="cap">{html.escape(caption)}</div></div>'


def _table(headers: list[str], rows: list[list], text_columns: tuple[int, ...] = (0,)) -> str:
    def cell(tag, value, index):
        cls = ' class="t"' if index in text_columns else ""
        return f"<{tag}{cls}>{html.escape(str(value))}</{tag}>"

    head = "".join(cell("th", h, i) for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(cell("td", v, i) for i, v in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value, digits: int = 4) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def _page(title: str, subtitle: str, body: str) -> str:
    return (f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f'<p class="sub">{html.escape(subtitle)}</p>{body}</body></html>\n')


def _cards(cards: list[tuple[str, str]]) -> str:
    return '<div class="cards">' + "".join(
        f'<div class="card"><div class="v">{html.escape(v)}</div><div class="l">{html.escape(l)}</div></div>'
        for v, l in cards) + "</div>"


def headline(report: BuildReport) -> dict[str, float | None]:
    """The three numbers a person wants first: size ratio, accuracy (first output), speed-up (largest batch)."""
    accuracy = None
    if report.accuracy is not None and report.accuracy.outputs:
        accuracy = next(iter(report.accuracy.outputs.values())).cosine_mean
    speedup = None
    if report.bench and report.bench.shapes and report.bench.shapes[-1].ratio_p50:
        speedup = 1.0 / report.bench.shapes[-1].ratio_p50
    return {"size_ratio": report.params.model_ratio, "linear_ratio": report.params.linear_ratio,
            "cosine": accuracy, "speedup": speedup}


def build_sections(report: BuildReport, sweep: SweepReport | None = None) -> str:
    """The body of a build report: summary cards, accuracy (per budget too, with a sweep), plots and tables."""
    p, c = report.params, report.config
    top = headline(report)
    cards = [(f"{p.model_ratio:.2f}×", f"model parameters kept ({p.model_after:,} of {p.model_before:,})"),
             (f"{p.linear_ratio:.2f}×", f"linear-layer parameters kept (budget {c.rank_budget})")]
    language_model = report.accuracy.language_model() if report.accuracy is not None else None
    classifier = report.accuracy.classifier() if report.accuracy is not None else None
    if language_model is not None:
        lm = language_model[1]
        cards.append((f"×{lm.ppl_ratio:.3f}", f"perplexity ({lm.ppl_dense:.2f} → {lm.ppl:.2f}, "
                                                      "held-out)"))
        cards.append((f"{lm.top1_agreement:.3f}", "next-token top-1 agreement with the original"))
    elif classifier is not None:
        cards.append((f"{classifier[1].top1_agreement:.3f}", "top-1 class agreement with the original (held-out)"))
    elif top["cosine"] is not None:
        cards.append((f"{top['cosine']:.3f}", "mean cosine to the original (held-out)"))
    if top["speedup"] is not None:
        shape = report.bench.shapes[-1]
        cards.append((f"{top['speedup']:.2f}×", f"faster at {shape.label} ({report.bench.backend})"))
    parts = [_cards(cards)]
    if report.warnings:
        parts.append("".join(f'<p class="warn">Warning: {html.escape(w)}</p>' for w in report.warnings))
    task = report.accuracy.task_table() if report.accuracy is not None else None
    if task is not None:
        title, headers, cells = task
        parts.append(f"<h2>{html.escape(title)}</h2>")
        parts.append(_table(list(headers), [cells]))
    if report.generated:
        parts.append("<h2>Generated text (greedy, both models)</h2>")
        parts.append(_table(["prompt", "dense", "compressed"],
                            [[g.prompt, g.dense, g.compressed] for g in report.generated], text_columns=(0, 1, 2)))
    if report.accuracy is not None:
        a = report.accuracy
        parts.append(f"<h2>Accuracy on {a.samples} held-out samples</h2>")
        parts.append(_table(["output", "cosine mean", "cosine p5", "rel. L2", "max abs", f"top-{a.neighbours} neighbours"],
                            [[n, _fmt(o.cosine_mean), _fmt(o.cosine_p5), _fmt(o.rel_l2), f"{o.max_abs:.4g}",
                              _fmt(o.topk_agreement, 3)] for n, o in a.outputs.items()]))
    if sweep is not None:
        parts.append(sweep_sections(sweep))
    heatmap = kept_heatmap(report.layers) if sum(l.status != "skipped" for l in report.layers) >= MANY_LAYERS else None
    if heatmap is not None:
        parts.append("<h2>What each block keeps</h2>")
        parts.append(_figure(heatmap, "weights kept per block and projection",
                             "Fraction of each linear layer's weights kept (rank, neurons or heads), blocks left to "
                             "right; 1 is dense."))
    else:
        parts.append("<h2>Ranks</h2>")
        parts.append(_figure(ranks_plot(report.layers), "rank kept per layer",
                             "Rank kept per linear layer in model order; the red line is the rank above which a split "
                             "would not save parameters."))
    if report.spectra:
        parts.append("<h2>Why features, not weights</h2>")
        parts.append(_figure(spectra_plot(report.spectra), "eigen-spectra",
                             "Cumulative energy against rank: the layer's output features (solid, calibrated "
                             "eigenvalues) concentrate in few directions; its weight (dashed, singular values²) does not."))
    if report.bench:
        result = report.bench
        parts.append("<h2>Latency</h2>")
        parts.append(_figure(latency_plot(result), "latency dense vs compressed",
                             f"p50 latency (whiskers to p90), runs alternated; {result.device}."))
        rows = [[s.label, *(f"{s.latency[m].p50_ms:.2f}" for m in result.models), _fmt(s.ratio_p50, 3)]
                for s in result.shapes]
        parts.append(_table(["batch × seq", *(f"{m} p50 ms" for m in result.models), "ratio"], rows))
    parts.append(f"<h2>Layers</h2><details{' open' if len(report.layers) < MANY_LAYERS else ''}>"
                 f"<summary>{len(report.layers)} layers</summary>")
    parts.append(_table(
        ["layer", "pattern", "d_in", "d_out", "rank", "params before", "params after", "status", "FLOP speed-up",
         "measured speed-up", "reason"],
        [[l.name, l.pattern, l.d_in or "", l.d_out or "", "" if l.rank is None else l.rank, f"{l.params_before:,}",
          f"{l.params_after:,}", l.status, _fmt(l.predicted_speedup, 2), _fmt(l.measured_speedup, 2), l.reason]
         for l in report.layers], text_columns=(0, 1, 7, 10)))
    parts.append("</details>")
    parts.append("<h2>Run</h2>")
    parts.append(_table(["stage", "seconds", "peak RSS (MB)"], [[k, f"{v:.2f}", report.peak_rss_mb.get(k, "")]
                                                              for k, v in report.timings.items()]))
    parts.append(f"<p class='cap'>lrdeploy {html.escape(report.lrdeploy_version)}; method {c.method}, allocation "
                 f"{c.allocation}, rank multiple {c.rank_multiple}{', sequential refit' if c.refit else ''}; calibration: "
                 f"{c.calib_samples} samples from {html.escape(c.calib_source)}; evaluation: "
                 f"{html.escape(c.eval_source)}.</p>")
    if report.finetune is not None:
        f = report.finetune
        parts.append(f"<p class='cap'>Fine-tuned by label-free distillation: {html.escape(f.summary())}.</p>")
        if f.history:
            what = "Next-token KL" if f.metric == "kl" else "Cosine to the original"
            parts.append(_figure(distillation_plot(f), "distillation curve",
                                 f"{what} on the check split during distillation; the starred checkpoint is the one "
                                 "exported."))
    return "".join(parts)


def sweep_sections(sweep: SweepReport) -> str:
    """Per-budget table, accuracy-per-budget and Pareto plots of a sweep."""
    points = sorted(sweep.points, key=lambda p: p.budget)
    parts = ["<h2>Accuracy per budget</h2>", '<div class="row">']
    labelled = any(p.top1_agreement is not None for p in points)  # a language model's or a classifier's top-1
    language_model = any(p.ppl_ratio is not None for p in points)
    metrics = ["top1_agreement", "cosine_mean"] if labelled else ["cosine_mean", "cosine_p5", "topk_agreement"]
    task_metric = "ppl_ratio" if language_model else "top1_agreement"
    shown = task_metric if labelled and sweep.metric == "cosine_mean" else sweep.metric
    parts.append(_figure(budget_plot(points, metrics), "accuracy per budget",
                         f"Output '{sweep.output}', held-out samples; one calibration for every budget."))
    parts.append(_figure(pareto_plot(points, shown, sweep.chosen), "pareto",
                         "Accuracy against cost; the star marks the budget kept."))
    parts.append("</div>")
    parts.append(_table(*sweep_table(points)))
    if sweep.target is not None:
        verdict = (f"smallest budget meeting it: ρ={sweep.chosen:.3f}" if sweep.chosen is not None
                   else "not met at any budget tried")
        parts.append(f"<p>Target {html.escape(sweep.metric)} {target_sign(sweep.metric)} {sweep.target}: {verdict}.</p>")
    return "".join(parts)


def render_build_html(report: BuildReport, sweep: SweepReport | None = None, title: str = "lrdeploy build report") -> str:
    subtitle = f"{report.input_model} → {report.output_model}"
    return _page(title, subtitle, build_sections(report, sweep))
