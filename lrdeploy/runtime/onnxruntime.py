"""ONNX Runtime sessions for in-memory or on-disk models.

Models under the protobuf limit are handed to ONNX Runtime as bytes; larger ones are written with
external data to a temporary folder first (ONNX Runtime cannot take a >2 GB message).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import onnx

PROTOBUF_LIMIT_BYTES = (1 << 31) - (1 << 20)


def session_options(threads: int = 0):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    return options


def create_session(model: onnx.ModelProto | Path, threads: int = 0, providers: list[str] | None = None):
    """An InferenceSession for `model` (a ModelProto or a path), on CPU unless `providers` says otherwise."""
    import onnxruntime as ort

    providers = providers or ["CPUExecutionProvider"]
    options = session_options(threads)
    if isinstance(model, (str, Path)):
        return ort.InferenceSession(str(model), options, providers=providers)
    if model.ByteSize() < PROTOBUF_LIMIT_BYTES:
        return ort.InferenceSession(model.SerializeToString(), options, providers=providers)
    with tempfile.TemporaryDirectory(prefix="lrdeploy-ort-") as tmp:
        path = Path(tmp) / "model.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location="model.onnx.data")
        return ort.InferenceSession(str(path), options, providers=providers)  # proto was converted in place
