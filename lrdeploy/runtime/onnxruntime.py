"""ONNX Runtime: sessions for in-memory or on-disk models, and a Runner for the CPU and CUDA providers.

Models under the protobuf limit are handed to ONNX Runtime as bytes; larger ones are written with
external data to a temporary folder first (ONNX Runtime cannot take a >2 GB message).
"""

from __future__ import annotations

import os
import platform
import re
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import external_data_helper

from lrdeploy.errors import MissingDependencyError, ModelLoadError
from lrdeploy.runtime.base import Runner

PROTOBUF_LIMIT_BYTES = (1 << 31) - (1 << 20)
PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def session_options(threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def check_provider(provider: str) -> None:
    """Raise MissingDependencyError when this ONNX Runtime build lacks `provider`."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if provider not in available:
        raise MissingDependencyError(
            f"ONNX Runtime here has no {provider} (it has {', '.join(available)}); on a machine with an NVIDIA "
            "GPU install onnxruntime-gpu (pip install lrdeploy[gpu]) or use --backend ort-cpu"
        )


def create_session(model: onnx.ModelProto | Path, threads: int = 0, providers: list[str] | None = None,
                   external_dir: Path | None = None):
    """An InferenceSession for `model` (a ModelProto or a path), on CPU unless `providers` says otherwise.

    A ModelProto over protobuf's 2 GB limit is saved with external data to a temporary folder for the session;
    its weights are read back afterwards, so the caller's proto is unchanged. A ModelProto that refers to external
    data it does not hold (a model loaded with its weights mapped, `onnx_io.load_model`) names the folder they are
    read from, `external_dir`: ONNX Runtime maps them there itself, and the proto stays small.
    """
    import onnxruntime as ort

    providers = providers or [PROVIDERS["cpu"]]
    options = session_options(threads)
    if external_dir is not None:
        options.add_session_config_entry("session.model_external_initializers_file_folder_path", str(external_dir))
    with refusals_named():
        if isinstance(model, (str, Path)):
            return ort.InferenceSession(str(model), options, providers=providers)
        serialized = _serialized_under_limit(model)
        if serialized is not None:
            return ort.InferenceSession(serialized, options, providers=providers)
        with tempfile.TemporaryDirectory(prefix="lrdeploy-ort-") as tmp:
            path = Path(tmp) / "model.onnx"
            onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
            try:
                return ort.InferenceSession(str(path), options, providers=providers)
            finally:  # saving moved the weights out of `model`: bring them back before the folder goes
                external_data_helper.load_external_data_for_model(model, tmp)


def _serialized_under_limit(model: onnx.ModelProto) -> bytes | None:
    """The model's bytes, or None past protobuf's 2 GB limit. Serialized straight away: sizing it first
    (`ByteSize`) costs as much as serializing (1.7 s for SmolLM2's 539 MB), and the sensitivity stage makes a
    session per group of layers."""
    try:
        serialized = model.SerializeToString()
    except Exception:  # noqa: BLE001 — ValueError/EncodeError: past 2 GB protobuf cannot serialize it
        return None
    return serialized if len(serialized) < PROTOBUF_LIMIT_BYTES else None


@contextmanager
def refusals_named() -> Iterator[None]:
    """A model ONNX Runtime will not load (one onnx's checker passed: duplicate node names, a broken Loop body) is
    one line naming ONNX Runtime's complaint, not its C++ traceback."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    try:
        yield
    except (state.Fail, state.InvalidGraph, state.InvalidArgument, state.NotImplemented,
            state.RuntimeException, state.InvalidProtobuf) as exc:
        complaint = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", " ".join(str(exc).split()))
        raise ModelLoadError(f"ONNX Runtime cannot load the model: {complaint[:400]}; fix the model or re-export it "
                             "so that ONNX Runtime runs it") from None


def cpu_description() -> str:
    """CPU model name and core count, e.g. "AMD EPYC 7B13 (2 cores)", for reports."""
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            name = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} cores)"


class OrtRunner(Runner):
    """An ONNX model on ONNX Runtime, `device` "cpu" or "cuda"."""

    def __init__(self, model: Path | onnx.ModelProto, device: str = "cpu", threads: int = 0, name: str | None = None,
                 precision: str = "fp32"):
        """`model`: a file or a ModelProto. `precision` says what it is (an FP16 model converted beforehand runs
        as "fp16"), for reports."""
        super().__init__(name or Path(model).name)
        self.model = model if isinstance(model, onnx.ModelProto) else Path(model)
        self.precision = precision
        self._device = device
        self.threads = threads
        self.backend = f"ort-{device}"
        self.session = None

    @property
    def device(self) -> str:
        return "cuda" if self._device == "cuda" else cpu_description()

    def activate(self) -> None:
        provider = PROVIDERS[self._device]
        check_provider(provider)
        self.session = create_session(self.model, self.threads, [provider])
        self.active = True

    def infer(self, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        names = [o.name for o in self.session.get_outputs()]
        return dict(zip(names, self.session.run(names, feed)))

    def bind(self, feed: dict[str, np.ndarray]) -> None:
        """I/O binding: inputs copied to the device once, outputs allocated there (no host copy per run)."""
        import onnxruntime as ort

        device = "cuda" if self._device == "cuda" else "cpu"
        binding = self.session.io_binding()
        for name, value in feed.items():
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(value), device, 0))
        for output in self.session.get_outputs():
            binding.bind_output(output.name, device)
        self._bound = binding

    def run_bound(self) -> None:
        self.session.run_with_iobinding(self._bound)  # returns once the provider's stream is synchronised

    def deactivate(self) -> None:
        self.session = None
        super().deactivate()

    def versions(self) -> dict[str, str]:
        import onnxruntime as ort

        return {"onnxruntime": ort.__version__}
