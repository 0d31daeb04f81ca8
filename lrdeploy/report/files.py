"""Writing reports: each file atomically, with the rendering it needs."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

from lrdeploy.bench.measure import BenchResult
from lrdeploy.files import atomic_path, atomic_write_text
from lrdeploy.report.html import render_build_html
from lrdeploy.report.markdown import bench_markdown, render_markdown, sweep_markdown
from lrdeploy.report.model import BuildReport, SweepReport
from lrdeploy.report.plots import latency_plot

REPORT_FILES = ("report.json", "report.md", "report.html")
BENCH_FILES = ("bench.json", "bench.md", "bench_latency.png")


def strict_json(data) -> str:
    """JSON that every parser accepts: NaN and infinities (e.g. a metric of an output that is all zeros) become
    null instead of the bare NaN that json.dumps writes by default."""
    def finite(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(data), indent=2, allow_nan=False) + "\n"


def write_reports(report: BuildReport, directory: Path) -> tuple[Path, Path, Path]:
    """Write report.json, report.md and report.html into `directory` atomically; return their paths."""
    directory = Path(directory)
    json_path, md_path, html_path = (directory / name for name in REPORT_FILES)
    atomic_write_text(json_path, strict_json(report.to_dict()))
    atomic_write_text(md_path, render_markdown(report))
    atomic_write_text(html_path, render_build_html(report))
    return json_path, md_path, html_path


def write_sweep(report: SweepReport, main: BuildReport, directory: Path, title: str = "lrdeploy sweep report") -> None:
    """Write sweep.json, sweep.md and report.html (the sweep's curves around `main`, the build that heads it)."""
    directory = Path(directory)
    atomic_write_text(directory / "sweep.json", strict_json(dataclasses.asdict(report)))
    atomic_write_text(directory / "sweep.md", sweep_markdown(report))
    atomic_write_text(directory / "report.html", render_build_html(main, report, title))


def write_bench(result: BenchResult, directory: Path, command: str) -> list[Path]:
    """Write bench.json (with the command that produced it), bench.md and bench_latency.png."""
    directory = Path(directory)
    json_path, md_path, png_path = (directory / name for name in BENCH_FILES)
    atomic_write_text(json_path, strict_json({"command": command, **dataclasses.asdict(result)}))
    atomic_write_text(md_path, bench_markdown(result))
    with atomic_path(png_path) as tmp:
        tmp.write_bytes(latency_plot(result))
    return [json_path, md_path, png_path]
