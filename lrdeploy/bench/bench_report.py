"""Benchmark results rendered as bench.json, bench.md and bench_latency.png."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from lrdeploy.bench.measure import BenchResult
from lrdeploy.bench.plots import latency_plot
from lrdeploy.files import atomic_path, atomic_write_text


def bench_markdown(result: BenchResult) -> str:
    lines = [
        f"# lrdeploy bench: {', '.join(result.models)}",
        "",
        f"backend {result.backend}, precision {result.precision}, device {result.device}, "
        + ", ".join(f"{k} {v}" for k, v in result.versions.items()),
        "",
        "| model | batch × seq | mean ms | p50 ms | p90 ms | p95 ms | p99 ms | inferences/s | tokens/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for shape in result.shapes:
        for name, s in shape.latency.items():
            lines.append(f"| {name} | {shape.batch} × {shape.seq} | {s.mean_ms:.2f} | {s.p50_ms:.2f} | {s.p90_ms:.2f} | "
                         f"{s.p95_ms:.2f} | {s.p99_ms:.2f} | {s.inferences_per_s:.1f} | {s.tokens_per_s:.0f} |")
    ratios = [s for s in result.shapes if s.ratio_p50 is not None]
    if ratios:
        lines += ["", f"Latency ratio {result.models[1]} / {result.models[0]} (runs alternated):", "",
                  "| batch × seq | p50 ratio | mean ratio |", "|---|---|---|"]
        lines += [f"| {s.batch} × {s.seq} | {s.ratio_p50:.3f} | {s.ratio_mean:.3f} |" for s in ratios]
    return "\n".join(lines) + "\n"


def write_bench(result: BenchResult, directory: Path, command: str) -> list[Path]:
    """Write bench.json (with the command that produced it), bench.md and bench_latency.png."""
    directory = Path(directory)
    json_path, md_path, png_path = directory / "bench.json", directory / "bench.md", directory / "bench_latency.png"
    atomic_write_text(json_path, json.dumps({"command": command, **dataclasses.asdict(result)}, indent=2) + "\n")
    atomic_write_text(md_path, bench_markdown(result))
    with atomic_path(png_path) as tmp:
        tmp.write_bytes(latency_plot(result))
    return [json_path, md_path, png_path]
