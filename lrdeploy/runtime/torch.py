"""PyTorch modules as Runners: CPU or CUDA, FP32/FP16/BF16, with CUDA graphs where possible.

With CUDA graphs each input shape is captured once (after a warm-up on a side stream) and replayed,
which removes Python and kernel-launch overhead: the figure that matches TensorRT's enqueue time.
"""

from __future__ import annotations

import numpy as np

from lrdeploy.errors import MissingDependencyError
from lrdeploy.runtime.base import Runner

DTYPES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def require_torch():
    try:
        import torch
    except ImportError:
        raise MissingDependencyError("PyTorch is not installed; run `pip install torch==2.13.0`") from None
    return torch


class TorchRunner(Runner):
    """Runs `module(**feed)`; floating inputs and weights are cast to `precision`, integer inputs kept."""

    def __init__(self, module, name: str = "torch", device: str = "cpu", precision: str = "fp32",
                 cuda_graphs: bool = True):
        super().__init__(name)
        self.module = module
        self._device = device
        self.precision = precision
        self.backend = f"torch-{device}"
        self.cuda_graphs = cuda_graphs and device == "cuda"
        self._graphs: dict = {}

    @property
    def device(self) -> str:
        torch = require_torch()
        return torch.cuda.get_device_name() if self._device == "cuda" else "cpu"

    def activate(self) -> None:
        torch = require_torch()
        if self._device == "cuda" and not torch.cuda.is_available():
            raise MissingDependencyError("PyTorch sees no CUDA GPU here; use --backend ort-cpu or a GPU machine")
        self._dtype = getattr(torch, DTYPES[self.precision])
        self.module = self.module.to(self._device, self._dtype).eval()
        self.active = True

    def _tensors(self, feed: dict[str, np.ndarray]) -> dict:
        torch = require_torch()
        tensors = {}
        for name, value in feed.items():
            tensor = torch.from_numpy(np.ascontiguousarray(value)).to(self._device)
            tensors[name] = tensor.to(self._dtype) if tensor.is_floating_point() else tensor
        return tensors

    @staticmethod
    def _as_dict(output) -> dict:
        if isinstance(output, dict):
            return dict(output)
        if isinstance(output, (tuple, list)):
            return {f"output_{i}": o for i, o in enumerate(output)}
        return {"output": output}

    def _graph_for(self, feed: dict[str, np.ndarray]):
        """(static inputs, static outputs, CUDAGraph) for this feed's shapes, captured on first use."""
        torch = require_torch()
        key = tuple((name, value.shape, value.dtype.str) for name, value in sorted(feed.items()))
        if key not in self._graphs:
            static_inputs = self._tensors(feed)
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.inference_mode():
                for _ in range(3):
                    self.module(**static_inputs)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.inference_mode():
                static_outputs = self._as_dict(self.module(**static_inputs))
            self._graphs[key] = (static_inputs, static_outputs, graph)
        return self._graphs[key]

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        torch = require_torch()
        if self.cuda_graphs:
            static_inputs, static_outputs, graph = self._graph_for(feed)
            for name, tensor in self._tensors(feed).items():
                static_inputs[name].copy_(tensor)
            graph.replay()
            outputs = static_outputs
        else:
            with torch.inference_mode():
                outputs = self._as_dict(self.module(**self._tensors(feed)))
        return {name: value.float().cpu().numpy() for name, value in outputs.items()}

    def bind(self, feed: dict[str, np.ndarray]) -> None:
        """The feed as tensors on the device (copied into the CUDA graph's static inputs when graphs are on)."""
        if self.cuda_graphs:
            static_inputs, static_outputs, graph = self._graph_for(feed)
            for name, tensor in self._tensors(feed).items():
                static_inputs[name].copy_(tensor)
            self._bound = graph
        else:
            self._bound = self._tensors(feed)

    def run_bound(self) -> None:
        torch = require_torch()
        if self.cuda_graphs:
            self._bound.replay()
        else:
            with torch.inference_mode():
                self.module(**self._bound)
        if self._device == "cuda":
            torch.cuda.synchronize()

    def deactivate(self) -> None:
        self._graphs.clear()
        super().deactivate()

    def versions(self) -> dict[str, str]:
        torch = require_torch()
        return {"torch": torch.__version__, **({"cuda": torch.version.cuda} if self._device == "cuda" else {})}
