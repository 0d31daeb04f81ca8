"""`lrdeploy bench`: time one model, or two side by side, on a backend; write JSON, Markdown and a plot.

Backends: ort-cpu and ort-cuda (ONNX files), trt (an engine, or an ONNX file built into one first through
Polygraphy), torch-cpu and torch-cuda (a `package.module:function` factory returning a module and a
dict of example inputs, as `lrdeploy export --factory` takes).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path

import numpy as np

from lrdeploy.bench.feeds import check_input_memory, timing_feed
from lrdeploy.bench.measure import BenchResult, BenchSettings, Shape, ShapeResult, benchmark
from lrdeploy.calib.data import InputSpec, is_past_input, model_input_specs
from lrdeploy.errors import ModelLoadError, OptionError
from lrdeploy.onnx_io import load_model
from lrdeploy.passes.precision import HALF_PRECISIONS, check_half_precision
from lrdeploy.runtime.base import BACKENDS, Runner




@dataclass
class BenchConfig:
    models: list[str]
    backend: str = "ort-cpu"
    _: KW_ONLY  # the rest by name: wide records built positionally hide their mistakes
    batches: tuple[int, ...] = (1, 8, 32)
    seq: int = 128
    past: int = 256  # a decoder with a KV cache: the past length its decode step is timed over
    settings: BenchSettings = field(default_factory=BenchSettings)
    threads: int = 0
    precision: str | None = None  # None: fp16 on GPU backends, fp32 on CPU ones
    optimize: str = "none"  # "ort": run ONNX Runtime's transformer optimizer on every ONNX model compared

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise OptionError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}; pick one of those")
        if self.precision is None:
            self.precision = "fp32" if self.backend.endswith("-cpu") else "fp16"
        if self.backend == "ort-cpu" and self.precision != "fp32":
            raise OptionError(f"--precision {self.precision} on ort-cpu: ONNX Runtime's CPU provider runs FP32 models "
                              "(it would time casts, not FP16 kernels); use --precision fp32, or --backend ort-cuda")
        if self.backend == "ort-cuda":
            check_half_precision(self.precision)
        if self.optimize not in ("none", "ort") or (self.optimize == "ort" and not self.backend.startswith("ort-")):
            raise OptionError(f"--optimize {self.optimize!r} applies to ONNX Runtime backends (ort-cpu, ort-cuda); "
                              "leave it out for --backend " + self.backend)
        if not 1 <= len(self.models) <= 2:
            raise OptionError("bench takes one model, or two to compare; pass MODEL [MODEL_B]")


def _torch_specs(example_inputs: dict) -> list[InputSpec]:
    return [InputSpec(name, np.dtype(str(t.dtype).removeprefix("torch.")), ("batch", "seq", *t.shape[2:]))
            for name, t in example_inputs.items()]


def _onnx_specs(path: Path) -> list[InputSpec]:
    if path.suffix == ".engine":
        raise ModelLoadError(f"{path} is a TensorRT engine, which does not say its inputs; bench the ONNX file it was "
                             "built from with --backend trt")
    return model_input_specs(load_model(path).proto)


def make_runner(model: str, config: BenchConfig, name: str, workdir: Path) -> tuple[Runner, list[InputSpec]]:
    """A runner for `model` on the configured backend, and the input specs to generate feeds from."""
    from lrdeploy.runtime.onnxruntime import OrtRunner

    if config.backend.startswith("torch-"):
        from lrdeploy.export.torch_onnx import load_factory
        from lrdeploy.runtime.torch import TorchRunner

        module, example_inputs = load_factory(model)
        runner = TorchRunner(module, name, config.backend.removeprefix("torch-"), config.precision)
        return runner, _torch_specs(example_inputs)
    path = Path(model)
    if not path.is_file():
        raise ModelLoadError(f"model file {path} does not exist; check the path")
    if config.optimize == "ort":
        path = optimized_copy(path, workdir / name)
    if config.backend.startswith("ort-"):
        specs = _onnx_specs(path)
        if config.precision in HALF_PRECISIONS:
            path = half_precision_copy(path, workdir / name / config.precision)
        return OrtRunner(path, config.backend.removeprefix("ort-"), config.threads, name, config.precision), specs
    from lrdeploy.export.trt import EngineConfig, build_engine
    from lrdeploy.runtime.tensorrt import TrtRunner

    specs = _onnx_specs(path)
    shapes = {s.name: tuple(
        tuple(b if i == 0 else (d if isinstance(d, int) else config.seq) for i, d in enumerate(s.shape))
        for b in (min(config.batches), max(config.batches), max(config.batches))) for s in specs}
    engine = build_engine(EngineConfig(path, workdir / f"{name}.engine", config.precision, shapes))
    return TrtRunner(engine, name, config.precision), specs


def half_precision_copy(path: Path, folder: Path) -> Path:
    """`path` converted to FP16 by ONNX Runtime's converter (inputs and outputs keep their types), in `folder`."""
    from lrdeploy.onnx_io import save_model
    from lrdeploy.passes.precision import to_float16

    loaded = load_model(path)
    folder.mkdir(parents=True, exist_ok=True)
    save_model(to_float16(loaded.proto), folder / path.name, external_data=loaded.external_data)
    return folder / path.name


def optimized_copy(path: Path, folder: Path) -> Path:
    """`path` as ONNX Runtime's transformer optimizer fuses it, saved in `folder` (a model that is already fused,
    e.g. the output of `build --optimize ort`, is used as it is)."""
    from lrdeploy.onnx_io import save_model
    from lrdeploy.passes.ort_fusion import fuse_for_onnxruntime, fused_op_counts

    loaded = load_model(path)
    if fused_op_counts(loaded.proto):
        return path
    folder.mkdir(parents=True, exist_ok=True)
    save_model(fuse_for_onnxruntime(loaded.proto), folder / path.name, external_data=loaded.external_data)
    return folder / path.name


def _unique_names(models: list[str]) -> list[str]:
    names = [Path(m).name if ":" not in m else m for m in models]
    if len(names) == 2 and names[0] == names[1]:
        names = [f"A:{names[0]}", f"B:{names[1]}"]
    return names


def _signature(specs: list[InputSpec]) -> list[tuple]:
    return [(s.name, str(s.dtype), len(s.shape)) for s in specs]


def check_feeds(config: BenchConfig, specs_per_model: list[list[InputSpec]]) -> None:
    """The models take the same inputs, every batch fits a fixed batch axis, and the largest feed fits in memory."""
    specs = specs_per_model[0]
    if any(_signature(other) != _signature(specs) for other in specs_per_model[1:]):
        described = ["(" + ", ".join(f"{n} {d} rank {r}" for n, d, r in _signature(s)) + ")" for s in specs_per_model]
        raise OptionError(f"the models take different inputs {' vs '.join(described)}; compare models of one input "
                          "signature")
    for spec in specs:
        fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) else None
        if fixed is not None and any(batch != fixed for batch in config.batches):
            raise OptionError(f"input {spec.name!r} has a fixed batch of {fixed}; bench it with --batch {fixed}")
    largest = max(config.batches)
    cached = any(is_past_input(s) for s in specs)
    longest = config.seq + config.past if cached else config.seq  # a cache's inputs and mask span the past too
    feed_bytes = sum(np.dtype(s.dtype).itemsize * largest * math.prod(
        d if isinstance(d, int) else longest for d in s.shape[1:]) for s in specs)
    check_input_memory(feed_bytes, f"--batch {largest} × --seq {config.seq}" + (f" over --past {config.past}" if cached
                       else ""), "lower --batch or --seq" + (" or --past" if cached else ""))


def bench_shapes(config: BenchConfig, specs: list[InputSpec]) -> list[Shape]:
    """Each batch × --seq; for a decoder with a KV cache two phases per batch: the prefill of --seq tokens (empty
    past) and one decode step (one new token over a past of --past tokens), the step generation repeats."""
    if not any(is_past_input(spec) for spec in specs):
        return [(batch, config.seq, None) for batch in config.batches]
    return [shape for batch in config.batches for shape in ((batch, config.seq, 0), (batch, 1, config.past))]


def run_bench(config: BenchConfig, on_shape=None) -> BenchResult:
    """Measure the configured models (alternating run by run when there are two)."""
    with tempfile.TemporaryDirectory(prefix="lrdeploy-bench-") as workdir:
        made = [make_runner(m, config, n, Path(workdir)) for m, n in zip(config.models, _unique_names(config.models))]
        runners = [runner for runner, _ in made]
        check_feeds(config, [model_specs for _, model_specs in made])
        specs = made[0][1]
        make_feed = lambda batch, seq, past: timing_feed(specs, batch, seq, past=past)  # noqa: E731
        result = benchmark(runners, make_feed, bench_shapes(config, specs), config.settings, on_shape)
        if config.optimize == "ort":
            from lrdeploy.passes.ort_fusion import fused_op_counts

            result.optimize = config.optimize
            result.fused_ops = {runner.name: fused_op_counts(load_model(runner.model).proto) for runner in runners}
    return result


def describe_shape(shape: ShapeResult) -> str:
    parts = [f"{name} p50 {s.p50_ms:.2f} ms" for name, s in shape.latency.items()]
    ratio = f", ratio {shape.ratio_p50:.3f}" if shape.ratio_p50 is not None else ""
    return f"{shape.label}: " + ", ".join(parts) + ratio
