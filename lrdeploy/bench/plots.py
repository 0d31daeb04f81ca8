"""matplotlib figures for reports, rendered off-screen (Agg) to PNG bytes."""

from __future__ import annotations

import io

from lrdeploy.bench.measure import BenchResult


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
    """p50 latency (with p90 whiskers) against batch size, one line per model; ratios annotated."""
    plt, fig, ax = _figure()
    batches = [s.batch for s in result.shapes]
    for name in result.models:
        p50 = [s.latency[name].p50_ms for s in result.shapes]
        p90 = [s.latency[name].p90_ms for s in result.shapes]
        ax.errorbar(batches, p50, yerr=[[0] * len(p50), [b - a for a, b in zip(p50, p90)]], marker="o", capsize=3,
                    label=name)
    for shape in result.shapes:
        if shape.ratio_p50 is not None:
            top = max(stats.p50_ms for stats in shape.latency.values())
            ax.annotate(f"×{shape.ratio_p50:.2f}", (shape.batch, top), textcoords="offset points", xytext=(0, 8),
                        ha="center", fontsize=8)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.set_xlabel(f"batch size (× {result.shapes[0].seq if result.shapes else '?'} tokens)")
    ax.set_ylabel("latency p50 (ms)")
    ax.set_title(f"{result.backend}, {result.precision}")
    ax.legend(fontsize=8)
    return _png(plt, fig)
