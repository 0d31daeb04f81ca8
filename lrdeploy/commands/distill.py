"""`lrdeploy distill`: compress a Hugging Face sentence embedder with the ONNX build pipeline (any allocation,
sensitivity included, and the optional refit), fine-tune the factors in PyTorch by label-free distillation
toward the original, and write the usual compressed ONNX model and report.

    HF folder ─export─► NAME.onnx ─prepare_build (calibrate, decompose, sensitivity)─► ranks + factors
    teacher (PyTorch) ─copy, factors in LowRankLinear─► student ─distill (mimic teacher)─► NAME.lowrank.onnx
    ─validate on the held-out sentences─► report.*

The structured cuts of the plan reach the student too (modules found by weight): narrower FFNs, fewer heads,
narrower value heads, and dropped blocks removed from its layer list (each kept block's output is matched to its
original's).

With `optimize="ort"` the plan is made (and its latency target held to the clock) on ONNX Runtime's fused graph,
as the dense model ships there; a fused Attention's packed Q|K|V is split in three to find the student's
Linears. Only FFN layers are split (the student is exported plain and fused again, and ORT's attention matcher
needs Q, K, V and the output projection as single MatMuls), and the student is written fused:

    NAME.onnx ─fuse─► plan (heads, FFN widths, FFN splits, drops) ─► student ─distill─► export ─fuse─► NAME.lowrank.onnx

With `target_cosine`, the sweep's bisection searches the smallest budget whose DISTILLED model meets the
target (every probed budget is distilled for the same number of steps).

Text: the demo's pydoc split (512 calibration / 1000 evaluation sentences) plus, for training, every other
pydoc sentence and the standard library's docstrings. The evaluation sentences are never trained on or used
to pick the checkpoint: a separate check split of the training pool does that.

A causal LM (`--task text-generation[-with-past]`, or a …ForCausalLM folder) is distilled on its next-token
distribution (KL(teacher ‖ student) per position) and block outputs, on windows of N tokens: calibration and
held-out windows from pydoc documents kept apart (as `lrdeploy data` makes them), training windows from the
rest of pydoc and the standard library's docstrings. The student is exported with the teacher's interface
(logits, or Optimum's KV-cache inputs and outputs) and its LM head tied like the teacher's.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from lrdeploy.calib.data import Feeds, InputSpec, SampleSet
from lrdeploy.errors import ModelLoadError
from lrdeploy.files import atomic_write_npz, check_output_dir, output_lock, publish
from lrdeploy.pipeline.build import BuildResult, ChosenFactors, PreparedBuild, prepare_build, realize_build
from lrdeploy.settings.build import BuildConfig, CalibrationSettings, ValidationSettings
from lrdeploy.progress import SILENT, Progress, StageTimer
from lrdeploy.pipeline.sweep import SweepSettings, run_sweep
from lrdeploy.report.model import FinetuneRecord, SweepReport
from lrdeploy.settings.distill import DistillSettings
from lrdeploy.torch.distill_config import DistillConfig

SPECS = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "sequence")),
         InputSpec("attention_mask", np.dtype(np.int64), ("batch", "sequence"))]
MASK = "attention_mask"
CHECK_SENTENCES = 256
CHECK_WINDOWS = 16  # a causal LM's check split (each scored on every next-token position)


@dataclass
class TextSplit:
    calib: list[str]
    check: list[str]
    train: list[str]
    evaluation: list[str]


def split_text(settings: DistillSettings) -> TextSplit:
    """Calibration and evaluation as in the demo; the training pool is every other sentence of the chosen
    texts, shuffled, minus a check split for picking the best checkpoint."""
    from lrdeploy.calib.text import docstring_sentences, pydoc_sentences, pydoc_split

    seed = settings.training.seed
    calib, evaluation = pydoc_split(settings.calib_sentences, settings.eval_sentences, seed)
    held_out = set(evaluation)
    texts = pydoc_sentences() + (docstring_sentences() if settings.train_text == "pydoc+docstrings" else [])
    pool = [s for s in dict.fromkeys(texts) if s not in held_out]
    order = np.random.default_rng(seed).permutation(len(pool))
    pool = [pool[i] for i in order]
    return TextSplit(calib, pool[:CHECK_SENTENCES], pool[CHECK_SENTENCES:], evaluation)


def _torch_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict]:
    import torch

    return [{k: torch.from_numpy(v) for k, v in feed.items()}
            for feed in Feeds(SPECS, batch_size, MASK).batches(SampleSet(arrays))]


def student_from_plan(teacher, prepared: PreparedBuild, chosen: ChosenFactors) -> tuple[object, list[tuple[str, str]],
                                                                                      set[int]]:
    """The teacher's copy with every choice of the plan (splits, FFN, head and value cuts, dropped blocks), the
    (student block, teacher block) module names whose hidden states are matched, and the dropped block indices."""
    from lrdeploy.torch.compress import (apply_factors, apply_head_cuts, apply_neuron_cuts, apply_value_cuts,
                                         remove_blocks)
    from lrdeploy.torch.distill import transformer_blocks

    student = copy.deepcopy(teacher)
    apply_factors(student, {layer.name: (layer.weight, chosen.factors[layer.name])
                            for layer in prepared.eligible if layer.name in chosen.factors})
    apply_neuron_cuts(student, chosen.structured.ffn)
    apply_head_cuts(student, chosen.structured.heads)
    apply_value_cuts(student, chosen.structured.values)
    removed = remove_blocks(student, chosen.structured.dropped)
    teacher_blocks = [name for index, name in enumerate(transformer_blocks(teacher)) if index not in removed]
    return student, list(zip(transformer_blocks(student), teacher_blocks)), removed  # each kept block, its original


class Distiller:
    """The Finetuner of `realize_build`: the teacher's copy gets the chosen factors and cuts, is distilled toward
    the teacher on `objective` (an embedding's cosine, or a causal LM's next-token KL), and comes back as an ONNX
    model written by `export(student, path)` (the teacher's interface)."""

    def __init__(self, teacher, export, batches: tuple[list[dict], list[dict]], config: DistillConfig,
                 objective, progress: Progress):
        self.teacher, self.export = teacher, export
        self.train_batches, self.check_batches = batches
        self.config, self.objective, self.progress = config, objective, progress

    def __call__(self, prepared: PreparedBuild, chosen: ChosenFactors) -> tuple[onnx.ModelProto, FinetuneRecord]:
        from lrdeploy.passes.ort_fusion import fuse_for_onnxruntime
        from lrdeploy.torch.distill import distill

        config = self.config
        student, hidden, removed = student_from_plan(self.teacher, prepared, chosen)
        record = FinetuneRecord(config.steps, config.lr, config.hidden_weight, config.freeze_embeddings,
                                sum(int(b["input_ids"].shape[0]) for b in self.train_batches), self.objective.metric)
        cuts = chosen.structured
        if chosen.factors or cuts.ffn or cuts.heads or cuts.values or removed:  # else nothing to recover
            metric = record.metric
            result = distill(student, self.teacher, self.train_batches, self.check_batches, config, hidden,
                             on_eval=lambda step, v: self.progress.note(f"  step {step}: check {metric} {v:.4f}"),
                             objective=self.objective)
            record.initial, record.best, record.best_step = result.initial, result.best, result.best_step
            record.history = result.history
        else:
            record.steps = 0
            record.initial = record.best = 0.0 if record.metric == "kl" else 1.0
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "student.onnx"
            self.export(student, path)
            proto = onnx.load(str(path))
        build = prepared.config
        if build.optimize == "ort":  # shipped as the dense model is: fused like it (the report compares fused ops)
            proto = fuse_for_onnxruntime(proto, build.num_heads, build.hidden_size)
        return proto, record


def run_distill(settings: DistillSettings, progress: Progress = SILENT) -> BuildResult | SweepReport:
    """Check every option, export, split text, prepare the ONNX build, then distill at `rank_budget` (a
    BuildResult) or search the smallest budget meeting `target_cosine` (a SweepReport). The exported teacher and
    the tokenized text are staged like the outputs: they appear in the output folder only if the run succeeds."""
    settings.check()
    out = check_output_dir(settings.output_dir)
    build_config(settings, out, out).check()  # every option, before anything is exported or written
    if not (Path(settings.hf_dir) / "config.json").is_file():
        raise ModelLoadError(f"{settings.hf_dir} is not a Hugging Face model folder (no config.json); pass the folder "
                             "save_pretrained wrote")
    with output_lock(out):
        work = Path(tempfile.mkdtemp(dir=out, prefix=".lrdeploy-distill-"))
        try:
            result = _distill(settings, build_config(settings, work, out), progress)
            publish(work, out)  # the teacher export and its text join the outputs, all or nothing
            return result
        finally:
            shutil.rmtree(work, ignore_errors=True)


def build_config(settings: DistillSettings, work: Path, out: Path) -> BuildConfig:
    """The build a distillation starts from: the teacher exported into `work` (a staging folder inside the output
    folder `out`, published beside the outputs when the run succeeds), its tokenized text, and distill's
    factorization, cuts and plan groups (copied: the build resolves its defaults in them)."""
    name = f"{Path(settings.hf_dir).name or 'model'}.onnx"
    splits = "ffn" if settings.optimize == "ort" else "any"
    return BuildConfig(model=work / name, reported_model=out / name, output_dir=out, optimize=settings.optimize,
                       calibration=CalibrationSettings(calib=str(work / "calib.npz"), seed=settings.training.seed),
                       factorization=dataclasses.replace(settings.factorization, splits=splits),
                       cuts=dataclasses.replace(settings.cuts), planning=dataclasses.replace(settings.planning),
                       validation=ValidationSettings(eval=work / "eval.npz"))


def _distill(settings: DistillSettings, config: BuildConfig, progress: Progress) -> BuildResult | SweepReport:
    import torch

    from lrdeploy.torch.distill import EMBEDDING, NEXT_TOKEN

    timer = StageTimer(progress)
    torch.manual_seed(settings.training.seed)
    with timer.stage("export"):
        teacher, export = (_export_causal_lm if settings.causal_lm() else _export_embedder)(settings, config.model)
    with timer.stage("tokenize"):
        text = (_lm_text if settings.causal_lm() else _sentence_text)(settings, config, progress)
    distiller = Distiller(teacher, export, text, settings.training,
                          NEXT_TOKEN if settings.causal_lm() else EMBEDDING, progress)
    if settings.target_cosine is not None:  # the report lists export and tokenize too, on either path
        return run_sweep(config, SweepSettings(budgets=[], target=settings.target_cosine, bench_batch=None), progress,
                         distiller, timer)
    prepared = prepare_build(config, progress, earlier=timer)
    return realize_build(prepared, settings.factorization.rank_budget, config.resolved_output_dir, progress, bench=False,
                         finetune=distiller)


def _export_embedder(settings: DistillSettings, path: Path):
    """The teacher (mean-pooled, normalised sentence embedder) exported to `path`, and how a student is exported."""
    from lrdeploy.export.torch_onnx import export_module, sentence_embedder

    teacher, examples = sentence_embedder(settings.hf_dir, "mean", True)
    export_module(teacher, examples, path, "embedding")
    return teacher, lambda student, out: export_module(student, examples, out, "embedding")


def _export_causal_lm(settings: DistillSettings, path: Path):
    """The teacher (a causal LM's logits) exported to `path` for the task, and how a student is exported: with the
    same interface (logits, or the KV cache's inputs and outputs)."""
    from lrdeploy.export.torch_onnx import causal_lm, export_causal_lm

    task = settings.resolved_task()
    teacher, _ = causal_lm(settings.hf_dir)
    export_causal_lm(teacher.model, path, task)
    return teacher, lambda student, out: export_causal_lm(student.model, out, task)


def _sentence_text(settings: DistillSettings, config: BuildConfig,
                   progress: Progress) -> tuple[list[dict], list[dict]]:
    """Calibration and held-out sentences saved for the build; (training, check) batches for distillation."""
    from lrdeploy.calib.text import tokenize

    text = split_text(settings)
    atomic_write_npz(Path(config.calibration.calib), tokenize(text.calib, settings.hf_dir))
    atomic_write_npz(config.validation.eval, tokenize(text.evaluation, settings.hf_dir))
    progress.note(f"{len(text.train)} training, {len(text.check)} check, {len(text.evaluation)} held-out evaluation "
                  "sentences")
    batch = settings.training_batch()
    return (_torch_batches(tokenize(text.train, settings.hf_dir), batch),
            _torch_batches(tokenize(text.check, settings.hf_dir), batch))


def _lm_text(settings: DistillSettings, config: BuildConfig, progress: Progress) -> tuple[list[dict], list[dict]]:
    """Calibration and held-out windows (pydoc documents kept apart) saved for the build; (training, check)
    batches from the rest of pydoc and, with "pydoc+docstrings", the standard library's docstrings."""
    from lrdeploy.calib.text import docstring_documents
    from lrdeploy.calib.windows import document_windows, text_documents, text_windows, window_inputs

    tokens, seed = settings.window_tokens, settings.training.seed
    calibration, evaluation, rest = text_windows(text_documents([], pydoc=True), settings.hf_dir, tokens,
                                                 settings.calib_windows, settings.eval_windows, seed, rest=True)
    atomic_write_npz(Path(config.calibration.calib), calibration)
    atomic_write_npz(config.validation.eval, evaluation)
    pool = rest["input_ids"]
    if settings.train_text == "pydoc+docstrings":
        pool = np.concatenate([pool, document_windows(docstring_documents(), settings.hf_dir, tokens)["input_ids"]])
    pool = pool[np.random.default_rng(seed).permutation(len(pool))]
    check, train = pool[:CHECK_WINDOWS], pool[CHECK_WINDOWS:]
    progress.note(f"{len(train)} training, {len(check)} check, {len(evaluation['input_ids'])} held-out windows of "
                  f"{tokens} tokens")
    batch = settings.training_batch()
    return _torch_batches(window_inputs(train), batch), _torch_batches(window_inputs(check), batch)
