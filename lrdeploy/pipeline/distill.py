"""`lrdeploy distill`: compress a Hugging Face sentence embedder in PyTorch, recover its accuracy by label-free
distillation, and export the result to ONNX with the usual report.

    HF folder ─sentence_embedder─► teacher ─copy─ compress (feature PCA) ─ distill (mimic teacher) ─► student
    teacher, student ─export (parity-checked)─► original.onnx, NAME.lowrank.onnx ─validate─► report.*

Text: Python's pydoc sentences by default; the evaluation split is never trained on.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lrdeploy import __version__
from lrdeploy.bench.report import BuildConfigRecord, BuildReport, LayerRecord, ParamSummary, write_reports
from lrdeploy.calib.data import InputSpec, SampleSet, iter_batches
from lrdeploy.files import prepare_output_dir
from lrdeploy.onnx_io import count_parameters, load_model
from lrdeploy.pipeline.validate import compare_models

SPECS = [InputSpec("input_ids", np.dtype(np.int64), ("batch", "sequence")),
         InputSpec("attention_mask", np.dtype(np.int64), ("batch", "sequence"))]


@dataclass
class DistillSettings:
    hf_dir: Path
    output_dir: Path
    rank_budget: float = 0.5
    steps: int = 1000
    method: str = "pca"
    allocation: str = "uniform"
    rank_multiple: int = 16
    lr: float = 5e-5
    batch_size: int = 32
    eval_every: int = 200
    calib_sentences: int = 512
    eval_sentences: int = 1000
    seed: int = 0


def _torch_batches(arrays: dict[str, np.ndarray], batch_size: int) -> list[dict]:
    import torch

    return [{k: torch.from_numpy(v) for k, v in feed.items()}
            for feed in iter_batches(SampleSet(arrays), SPECS, batch_size, "attention_mask")]


def _split_text(settings: DistillSettings) -> tuple[list[str], list[str], list[str]]:
    """(calibration, training, evaluation) sentences; training is every pydoc sentence not held out."""
    from lrdeploy.calib.text import pydoc_sentences, pydoc_split

    calib, evaluation = pydoc_split(settings.calib_sentences, settings.eval_sentences, settings.seed)
    held_out = set(evaluation)
    return calib, [s for s in pydoc_sentences() if s not in held_out], evaluation


def run_distill(settings: DistillSettings, console=None) -> tuple[BuildReport, dict]:
    import torch

    from lrdeploy.calib.text import tokenize
    from lrdeploy.export.torch_onnx import export_module, sentence_embedder
    from lrdeploy.torch.compress import compress
    from lrdeploy.torch.distill import DistillConfig, distill

    out = prepare_output_dir(settings.output_dir)
    timings: dict[str, float] = {}
    say = console.print if console is not None else (lambda *a, **k: None)
    torch.manual_seed(settings.seed)
    start = time.perf_counter()
    teacher, examples = sentence_embedder(settings.hf_dir, "mean", True)
    calib_text, train_text, eval_text = _split_text(settings)
    calib = _torch_batches(tokenize(calib_text, settings.hf_dir), settings.batch_size)
    train = _torch_batches(tokenize(train_text, settings.hf_dir), settings.batch_size)
    eval_arrays = tokenize(eval_text, settings.hf_dir)
    evaluation = _torch_batches(eval_arrays, settings.batch_size)
    timings["load"] = time.perf_counter() - start

    start = time.perf_counter()
    student = copy.deepcopy(teacher)
    compressed = compress(student, calib, settings.rank_budget, settings.method, settings.allocation,
                          settings.rank_multiple, exclude=("*pooler*",))
    timings["compress"] = time.perf_counter() - start
    say(f"compressed {sum(r is not None for r in compressed.plan.values())} of {len(compressed.plan)} linear layers")

    start = time.perf_counter()
    history = distill(student, teacher, train, evaluation, DistillConfig(steps=settings.steps, lr=settings.lr,
                                                                       eval_every=settings.eval_every),
                      on_eval=lambda step, cos: say(f"step {step}: held-out cosine {cos:.4f}"))
    timings["distill"] = time.perf_counter() - start

    start = time.perf_counter()
    original, lowrank = out / "original.onnx", out / "model.lowrank.onnx"
    export_module(teacher, examples, original, "embedding")
    export_module(student, examples, lowrank, "embedding")
    timings["export"] = time.perf_counter() - start
    start = time.perf_counter()
    feeds = iter_batches(SampleSet(eval_arrays), SPECS, 16, "attention_mask")
    accuracy = compare_models(original, lowrank, feeds, 1e-2, 1e-1)
    timings["validate"] = time.perf_counter() - start

    shapes = {s.name: s for s in compressed.shapes}
    layers = [LayerRecord(name, "nn.Linear", s.d_in, s.d_out, rank, s.dense_params, s.params(rank),
                          "dense" if rank is None else "factorized", "" if rank is not None else
                          "the allocated rank would not save parameters",
                          predicted_speedup=None if rank is None else s.dense_params / s.factored_params(rank))
              for name, rank in compressed.plan.items() for s in [shapes[name]]]
    linear_before = sum(s.dense_params for s in compressed.shapes)
    linear_after = sum(l.params_after for l in layers)
    before, after = count_parameters(load_model(original).proto), count_parameters(load_model(lowrank).proto)
    report = BuildReport(
        lrdeploy_version=__version__, input_model=str(settings.hf_dir), output_model=str(lowrank), external_data=False,
        config=BuildConfigRecord(settings.rank_budget, settings.method, f"{settings.allocation} + distillation "
                                 f"({settings.steps} steps)", settings.rank_multiple, len(calib_text),
                                 f"{len(calib_text)} pydoc sentences (distilled on {len(train_text)})",
                                 f"{len(eval_text)} held-out pydoc sentences"),
        layers=layers,
        params=ParamSummary(linear_before, linear_after, linear_after / linear_before, before, after, after / before),
        accuracy=accuracy, timings={k: round(v, 2) for k, v in timings.items()},
    )
    write_reports(report, out)
    return report, {"initial_cosine": history.initial_cosine, "best_cosine": history.best_cosine,
                    "best_step": history.best_step, "history": history.history}
