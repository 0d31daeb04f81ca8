"""One interface for every backend: activate, infer(feed) → outputs, deactivate (or use as a context manager).

`infer` returns host numpy arrays after the device has finished, so a timed `infer` call is a
synchronised end-to-end latency, the figure trtexec and Polygraphy report too.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

BACKENDS = ("ort-cpu", "ort-cuda", "trt", "torch-cpu", "torch-cuda")  # runtime and device, as `--backend` names them
PRECISIONS = ("fp32", "fp16", "bf16", "best")  # "best": every reduced precision the backend allows


class Runner(ABC):
    """A model ready to run on one backend; `backend`, `device` and `precision` describe it for reports."""

    backend: str = "unknown"
    precision: str = "fp32"

    def __init__(self, name: str):
        self.name = name
        self.active = False

    @abstractmethod
    def activate(self) -> None:
        """Load the model (sessions, engines, CUDA graphs are created here, not in __init__)."""

    @abstractmethod
    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one batch and return its outputs by name, on the host, after the device is done."""

    def bind(self, feed: dict[str, np.ndarray]) -> None:
        """Place `feed` where the runner reads it (on the device, for GPU runners) for `run_bound`; once per shape,
        outside any timed region. The default keeps the host arrays (what a CPU runner reads anyway)."""
        self._bound = feed

    def run_bound(self) -> None:
        """Run once on the bound feed and wait for the device; outputs stay where they were produced. Timing this
        times the device's work, as trtexec's GPU Compute Time does, with no host↔device copy inside."""
        self.infer(self._bound)

    def deactivate(self) -> None:
        self.active = False

    @property
    def device(self) -> str:
        return "cpu"

    def versions(self) -> dict[str, str]:
        """Versions of the libraries this runner uses, for reports."""
        return {}

    def __enter__(self) -> "Runner":
        self.activate()
        return self

    def __exit__(self, *exc) -> None:
        self.deactivate()
