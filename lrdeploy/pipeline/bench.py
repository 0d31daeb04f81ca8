"""`lrdeploy bench`: time one model, or two side by side, on a backend; write JSON, Markdown and a plot.

Backends: ort-cpu and ort-cuda (ONNX files), trt (an engine, or an ONNX file built into one first through
Polygraphy), torch-cpu and torch-cuda (a `package.module:function` factory returning a module and a
dict of example inputs, as `lrdeploy export --factory` takes).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from lrdeploy.bench.feeds import timing_feed
from lrdeploy.bench.measure import BenchResult, BenchSettings, ShapeResult, benchmark
from lrdeploy.calib.data import InputSpec, model_input_specs
from lrdeploy.errors import ModelLoadError, OptionError
from lrdeploy.onnx_io import load_model
from lrdeploy.runtime.base import BACKENDS, Runner



@dataclass
class BenchConfig:
    models: list[str]
    backend: str = "ort-cpu"
    batches: tuple[int, ...] = (1, 8, 32)
    seq: int = 128
    settings: BenchSettings = field(default_factory=BenchSettings)
    threads: int = 0
    precision: str = "fp16"

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise OptionError(f"--backend {self.backend!r} is not one of {', '.join(BACKENDS)}; pick one of those")
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
    if config.backend.startswith("ort-"):
        return OrtRunner(path, config.backend.removeprefix("ort-"), config.threads, name), _onnx_specs(path)
    from lrdeploy.export.trt import EngineConfig, build_engine
    from lrdeploy.runtime.tensorrt import TrtRunner

    specs = _onnx_specs(path)
    shapes = {s.name: tuple(
        tuple(b if i == 0 else (d if isinstance(d, int) else config.seq) for i, d in enumerate(s.shape))
        for b in (min(config.batches), max(config.batches), max(config.batches))) for s in specs}
    engine = build_engine(EngineConfig(path, workdir / f"{name}.engine", config.precision, shapes))
    return TrtRunner(engine, name, config.precision), specs


def _unique_names(models: list[str]) -> list[str]:
    names = [Path(m).name if ":" not in m else m for m in models]
    if len(names) == 2 and names[0] == names[1]:
        names = [f"A:{names[0]}", f"B:{names[1]}"]
    return names


def run_bench(config: BenchConfig, on_shape=None) -> BenchResult:
    """Measure the configured models (alternating run by run when there are two)."""
    with tempfile.TemporaryDirectory(prefix="lrdeploy-bench-") as workdir:
        made = [make_runner(m, config, n, Path(workdir)) for m, n in zip(config.models, _unique_names(config.models))]
        runners = [runner for runner, _ in made]
        specs = made[0][1]
        make_feed = lambda batch, seq: timing_feed(specs, batch, seq)  # noqa: E731
        return benchmark(runners, make_feed, list(config.batches), config.seq, config.settings, on_shape)


def describe_shape(shape: ShapeResult) -> str:
    parts = [f"{name} p50 {s.p50_ms:.2f} ms" for name, s in shape.latency.items()]
    ratio = f", ratio {shape.ratio_p50:.3f}" if shape.ratio_p50 is not None else ""
    return f"batch {shape.batch}×{shape.seq}: " + ", ".join(parts) + ratio
