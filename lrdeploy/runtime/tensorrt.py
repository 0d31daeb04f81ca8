"""TensorRT through Polygraphy: a Runner for a serialized engine (or an ONNX model built on the fly).

TensorRT is imported lazily; without it (or without an NVIDIA GPU) activation stops with a
MissingDependencyError that says what to install.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrdeploy.errors import MissingDependencyError
from lrdeploy.runtime.base import Runner

TENSORRT_MISSING = (
    "TensorRT is not installed; on a machine with an NVIDIA GPU run `pip install lrdeploy[gpu]` (tensorrt), "
    "or time the ONNX model on ONNX Runtime instead (`lrdeploy bench MODEL --backend ort-cuda`)"
)


def require_tensorrt():
    """The tensorrt module, or MissingDependencyError."""
    try:
        import tensorrt
    except ImportError:
        raise MissingDependencyError(TENSORRT_MISSING) from None
    return tensorrt


def require_cuda_device() -> None:
    """Raise MissingDependencyError unless a CUDA device is visible (checked through TensorRT's builder)."""
    trt = require_tensorrt()
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception:
        builder = None
    if builder is None:
        raise MissingDependencyError("TensorRT found no NVIDIA GPU here; build and run engines on a machine with one")


class TrtRunner(Runner):
    """A serialized TensorRT engine run by Polygraphy's TrtRunner."""

    backend = "trt"

    def __init__(self, engine: Path, name: str | None = None, precision: str = "engine"):
        super().__init__(name or Path(engine).name)
        self.engine = Path(engine)
        self.precision = precision
        self._runner = None

    @property
    def device(self) -> str:
        return "cuda"

    def activate(self) -> None:
        require_tensorrt()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes
        from polygraphy.backend.trt import TrtRunner as PolygraphyTrtRunner

        self._runner = PolygraphyTrtRunner(EngineFromBytes(BytesFromPath(str(self.engine))))
        self._runner.activate()
        self.active = True

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._runner.infer(feed)
        return {name: np.asarray(value) for name, value in outputs.items()}

    def deactivate(self) -> None:
        if self._runner is not None:
            self._runner.deactivate()
            self._runner = None
        super().deactivate()

    def versions(self) -> dict[str, str]:
        return {"tensorrt": require_tensorrt().__version__}
