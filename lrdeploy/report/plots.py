"""matplotlib figures for reports, rendered off-screen (Agg) to PNG bytes."""

from __future__ import annotations

import io
import re

from lrdeploy.bench.measure import BenchResult
from lrdeploy.report.model import FinetuneRecord


def _figure(width: float = 6.0, height: float = 3.6):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=110)
    ax.grid(True, alpha=0.3)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def latency_plot(result: BenchResult) -> bytes:
    """p50 latency (with p90 whiskers) against batch size, one line per model (and per phase, prefill and decode,
    for a decoder with a KV cache); ratios annotated."""
    plt, fig, ax = _figure()
    phases = list(dict.fromkeys(_phase(s) for s in result.shapes))
    for name in result.models:
        for phase, style in zip(phases, ("-", "--", ":")):
            shapes = [s for s in result.shapes if _phase(s) == phase]
            p50 = [s.latency[name].p50_ms for s in shapes]
            p90 = [s.latency[name].p90_ms for s in shapes]
            ax.errorbar([s.batch for s in shapes], p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p90)]],
                        marker="o", capsize=3, linestyle=style, label=f"{name} ({phase})" if phase else name)
    for shape in result.shapes:
        if shape.ratio_p50 is not None:
            top = max(stats.p50_ms for stats in shape.latency.values())
            ax.annotate(f"×{shape.ratio_p50:.2f}", (shape.batch, top), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
    batches = sorted({s.batch for s in result.shapes})
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    tokens = f"× {result.shapes[0].seq} tokens" if result.shapes and result.shapes[0].past is None else "per sample"
    ax.set_xlabel(f"batch size ({tokens})")
    ax.set_ylabel("latency p50 (ms)")
    ax.set_title(f"{result.backend}, {result.precision}")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def _phase(shape) -> str:
    """"prefill" or "decode" for a decoder with a KV cache, "" otherwise."""
    return "" if shape.past is None else ("prefill" if shape.past == 0 else "decode")


def short_names(names: list[str]) -> list[str]:
    """Layer names without their shared prefix and trailing op name: `/encoder/layer.0/attention/self/query/MatMul`
    → `layer.0/attention/self/query` when every name starts with `/encoder/`."""
    import os

    stripped = [n.removesuffix("/MatMul").removesuffix("/Gemm") for n in names]
    prefix = os.path.commonprefix(stripped) if len(stripped) > 1 else ""
    prefix = prefix[: prefix.rfind("/") + 1]
    return [n[len(prefix):] or n for n in stripped]


def ranks_plot(layers) -> bytes:
    """Rank kept per eligible layer (bars) against the layer's break-even rank (line), in model order."""
    plt, fig, ax = _figure(9.0, 4.2)
    shown = [l for l in layers if l.status != "skipped"]
    x = list(range(len(shown)))
    kept = [l.rank if l.rank is not None else min(l.d_in, l.d_out) for l in shown]
    colors = ["#2b7bba" if l.status == "factorized" else "#bbbbbb" for l in shown]
    ax.bar(x, kept, color=colors)
    ax.plot(x, [l.d_in * l.d_out / (l.d_in + l.d_out) for l in shown], color="#d62728", lw=1, label="break-even rank")
    ax.set_xticks(x, short_names([l.name for l in shown]), rotation=90, fontsize=6)
    ax.set_ylabel("rank kept (grey: dense)")
    ax.legend(fontsize=8)
    return _png(plt, fig)


MANY_LAYERS = 48  # from here one bar per layer is unreadable: blocks × projections instead
BLOCK_INDEX = re.compile(r"(?:^|[/._])(?:layers?|h|blocks?|block)[._/]?(\d+)(?=[/._])")


def block_grid(layers) -> tuple[list[int], list[str], dict[tuple[int, str], object]] | None:
    """(block indices, projection names, {(block, projection): layer}) when the layers' names say their block
    (`layers.12/mlp/up_proj`, `h.3/attn/c_attn`, `layer.0/attention/self/query`) for at least 4 blocks; None when
    they do not."""
    cells: dict[tuple[int, str], object] = {}
    for layer in layers:
        found = BLOCK_INDEX.search(layer.name)
        if found is None:
            continue
        rest = layer.name[found.end():].removesuffix("/MatMul").removesuffix("/Gemm").strip("/._")
        cells[(int(found.group(1)), rest or "(block)")] = layer
    blocks = sorted({block for block, _ in cells})
    if len(blocks) < 4:
        return None
    projections = list(dict.fromkeys(name for _, name in sorted(cells, key=lambda key: key[0])))
    return blocks, projections, cells


def kept_heatmap(layers) -> bytes | None:
    """Fraction of each layer's weights kept, blocks (columns) × projections (rows): the readable view of a model
    with hundreds of layers. None when the names do not say the blocks."""
    import numpy as np

    grid = block_grid([l for l in layers if l.status != "skipped" and l.params_before])
    if grid is None:
        return None
    blocks, projections, cells = grid
    values = np.full((len(projections), len(blocks)), np.nan)
    for (block, name), layer in cells.items():
        values[projections.index(name), blocks.index(block)] = layer.params_after / layer.params_before
    plt, fig, ax = _figure(max(6.0, 0.22 * len(blocks) + 2.5), 0.35 * len(projections) + 1.6)
    image = ax.imshow(values, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0)
    ax.set_xticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
    ax.set_yticks(range(len(projections)), projections, fontsize=7)
    ax.set_xlabel("block")
    fig.colorbar(image, ax=ax, label="weights kept")
    return _png(plt, fig)


def spectra_plot(spectra: dict[str, dict[str, list[float]]]) -> bytes:
    """Cumulative energy against rank: output-feature eigenvalues (solid) vs weight singular values² (dashed).

    Features reach most of their energy at a small rank; weights need most of theirs, which is why feature
    PCA beats weight SVD at the same rank."""
    import numpy as np

    plt, fig, ax = _figure(7.0, 4.0)
    for index, (name, spectrum) in zip(range(len(spectra)), zip(short_names(list(spectra)), spectra.values())):
        color = f"C{index}"
        for key, style in (("feature", "-"), ("weight", "--")):
            values = np.asarray(spectrum[key], np.float64)
            total = values.sum()
            if total > 0:
                ax.plot(np.arange(1, len(values) + 1), np.cumsum(values) / total, style, color=color,
                        label=f"{name} ({key})")
    ax.axhline(0.9, color="grey", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xlabel("rank")
    ax.set_ylabel("cumulative energy kept")
    ax.legend(fontsize=6, ncol=1)
    return _png(plt, fig)


def budget_plot(points, metrics: list[str]) -> bytes:
    """Accuracy metrics against the rank budget (one line per metric)."""
    plt, fig, ax = _figure()
    budgets = [p.budget for p in points]
    for metric in metrics:
        values = [getattr(p, metric) for p in points]
        if all(v is not None for v in values):
            ax.plot(budgets, values, marker="o", label=metric.replace("_", " "))
    ax.set_xlabel("rank budget ρ (linear parameters kept)")
    ax.set_ylabel("accuracy vs original")
    ax.legend(fontsize=8)
    return _png(plt, fig)


def pareto_plot(points, metric: str, chosen: float | None = None) -> bytes:
    """Accuracy against latency ratio (or parameter ratio when no latency was measured), budgets annotated."""
    plt, fig, ax = _figure()
    use_latency = all(p.latency_ratio is not None for p in points)
    xs = [p.latency_ratio if use_latency else p.linear_ratio for p in points]
    ys = [getattr(p, metric) for p in points]
    ax.plot(xs, ys, marker="o", color="#2b7bba")
    for p, x, y in zip(points, xs, ys):
        ax.annotate(f"ρ={p.budget:.2f}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
        if chosen is not None and abs(p.budget - chosen) < 1e-9:
            ax.plot([x], [y], marker="*", ms=14, color="#d62728", label="chosen")
    ax.set_xlabel("latency compressed / dense" if use_latency else "linear parameters kept")
    ax.set_ylabel(metric.replace("_", " "))
    if chosen is not None:
        ax.legend(fontsize=8)
    return _png(plt, fig)


def distillation_plot(record: FinetuneRecord) -> bytes:
    """The check split's metric (cosine, or next-token KL) against distillation step, the kept checkpoint starred."""
    plt, fig, ax = _figure(6.0, 3.0)
    steps = [h["step"] for h in record.history]
    values = [h["check"] for h in record.history]
    ax.plot(steps, values, marker="o", color="#2b7bba")
    best = steps.index(record.best_step) if record.best_step in steps else 0
    ax.plot([steps[best]], [values[best]], marker="*", ms=14, color="#d62728", label="kept")
    ax.set_xlabel("distillation step")
    ax.set_ylabel("next-token KL (check split)" if record.metric == "kl" else "cosine to the original (check split)")
    ax.legend(fontsize=8)
    return _png(plt, fig)
