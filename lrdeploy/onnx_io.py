"""Load and save ONNX models, including models whose weights live in external data files.

Loading refuses external-data locations that point outside the model's folder (a model file must
not be able to make lrdeploy read arbitrary files). Saving is atomic and keeps weights as external
data beside the model when the input used external data or the model is large (protobuf cannot
hold more than 2 GB in one message).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import external_data_helper

from lrdeploy.errors import ModelLoadError
from lrdeploy.files import default_file_mode
from lrdeploy.weights import WeightFiles, mappable, moved_out

LARGE_MODEL_BYTES = 1 << 30  # above this, weights go to an external data file


@dataclass
class LoadedModel:
    proto: onnx.ModelProto
    path: Path
    external_files: list[Path]
    weights: "WeightFiles | None" = None  # set when the big external tensors stay in their files (mapped)

    @property
    def external_data(self) -> bool:
        return bool(self.external_files)

    @property
    def mapped_dir(self) -> Path | None:
        """The folder `proto`'s external references are read from, when its weights are mapped (else None)."""
        return None if self.weights is None else self.weights.folder


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Initializers and tensor-valued attributes of `graph` and of its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            if attr.HasField("g"):
                yield from _graph_tensors(attr.g)
            for sub in attr.graphs:
                yield from _graph_tensors(sub)


def _all_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    return _graph_tensors(model.graph)


def _check_external_locations(model: onnx.ModelProto, model_dir: Path) -> list[Path]:
    """Refuse external locations outside `model_dir` or missing; return the external data files used.

    Where a location points is judged by the path the model names, not by where a link there leads: Hugging
    Face's hub cache keeps `model.onnx.data` beside `model.onnx` as a link into `../../blobs/`, and that is the
    file beside the model."""
    base = Path(os.path.normpath(model_dir.absolute()))
    found: set[Path] = set()
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        target = Path(os.path.normpath(base / location))
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelLoadError(
                f"tensor {tensor.name!r} points to external data {location!r} outside the model's folder; "
                "refusing to read it: move the data file beside the model and fix its location"
            )
        if not target.is_file():
            raise ModelLoadError(
                f"external data file {location!r} for tensor {tensor.name!r} is missing; "
                f"keep it beside the model in {model_dir}"
            )
        entries = {e.key: e.value for e in tensor.external_data}
        end = int(entries.get("offset", 0)) + int(entries.get("length", 0))
        if end > target.stat().st_size:
            raise ModelLoadError(
                f"external data file {location!r} is truncated: tensor {tensor.name!r} needs bytes up to {end} but "
                f"the file has {target.stat().st_size}; copy the complete file beside the model again"
            )
        found.add(target)
    return sorted(found)


def model_files(path: Path) -> list[Path]:
    """The model file and the external data files it names (what a command reading it must never write over);
    only the model itself where it cannot be read (the command's own load says why)."""
    path = Path(path)
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception:  # not ONNX, missing, a folder: nothing more to protect than the path itself
        return [path]
    locations = {next((e.value for e in tensor.external_data if e.key == "location"), "")
                 for tensor in _all_tensors(proto) if external_data_helper.uses_external_data(tensor)}
    return [path, *(path.parent / location for location in sorted(locations) if location)]


def load_model(path: Path, map_weights: bool = False) -> LoadedModel:
    """Load `path` with its external data, or raise ModelLoadError naming what is wrong. With `map_weights`, big
    external tensors stay references into their files (`lrdeploy.weights`): the model's weights are read when a
    step needs them, not held in memory."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model file {path} does not exist; check the path")
    if not path.is_file():
        raise ModelLoadError(f"{path} is not a file; pass the path of an .onnx model")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as exc:  # protobuf raises DecodeError and friends; all mean "not ONNX"
        raise ModelLoadError(
            f"{path} is not a valid ONNX model ({type(exc).__name__}); pass a .onnx file "
            "(export PyTorch models with torch.onnx.export)"
        ) from None
    if len(proto.graph.node) == 0:
        raise ModelLoadError(f"{path} is not a valid ONNX model (it has no graph nodes); pass a .onnx file")
    _check_opset(proto, path)
    external = _check_external_locations(proto, path.parent)
    if map_weights and external:
        _check_structure(path, path)
        files = WeightFiles(path.parent)
        for tensor in _all_tensors(proto):
            if external_data_helper.uses_external_data(tensor) and not mappable(tensor):
                files.read_inline(tensor)
        return LoadedModel(proto, path, external, files)
    if any(file.is_symlink() for file in external):  # onnx refuses links; the locations were checked above
        _read_linked_external_data(proto, path.parent)
        _check_structure(proto, path)
    else:
        _check_structure(path, path)
        if external:
            external_data_helper.load_external_data_for_model(proto, str(path.parent))
    weights = moved_out(proto) if map_weights else None
    if weights is not None:  # parsed again without the bytes that moved out: the first parse's memory is freed
        proto = onnx.load_from_string(proto.SerializeToString())
    return LoadedModel(proto, path, external, weights)


def _read_linked_external_data(model: onnx.ModelProto, model_dir: Path) -> None:
    """Read every external tensor into `model` through the links beside it (a Hugging Face hub cache keeps the
    data file beside the model as a link into its blobs; onnx's own loader refuses any link)."""
    for tensor in _all_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        entries = {e.key: e.value for e in tensor.external_data}
        with open(model_dir / entries["location"], "rb") as handle:
            handle.seek(int(entries.get("offset", 0)))
            length = int(entries["length"]) if "length" in entries else -1
            tensor.raw_data = handle.read(length)
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT


MIN_OPSET = 11  # the oldest default-domain opset lrdeploy's graphs (calibration, sensitivity) are written for


def _check_opset(proto: onnx.ModelProto, path: Path) -> None:
    """The model's default-domain opset is one lrdeploy and the installed onnx can work with."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None)
    newest = onnx.defs.onnx_opset_version()
    if opset is None or not MIN_OPSET <= opset <= newest:
        raise ModelLoadError(
            f"{path} uses ONNX opset {opset}, outside the {MIN_OPSET}–{newest} lrdeploy supports; re-export it with "
            f"an opset in that range (e.g. torch.onnx.export(..., opset_version=17))"
        )


def _check_structure(model: Path | onnx.ModelProto, path: Path) -> None:
    """onnx's checker on the file (by path, so external data and models over 2 GB work) or on a model read into
    memory: a model that breaks ONNX's rules (a name produced twice, an undefined input) would fail later with a
    long traceback."""
    try:
        onnx.checker.check_model(model if isinstance(model, onnx.ModelProto) else str(model), full_check=False)
    except onnx.checker.ValidationError as exc:
        first = next((line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__)
        raise ModelLoadError(f"{path} is not a valid ONNX model: {first}; fix or re-export the model") from None


def external_data_name(model_path: Path) -> str:
    return f"{Path(model_path).name}.data"


PROTOBUF_LIMIT = 1 << 31


def serialized_size(model: onnx.ModelProto) -> int:
    """Bytes `model` serializes to; protobuf cannot even size a message past 2 GB, so that counts as 2 GB."""
    try:
        return model.ByteSize()
    except Exception:  # noqa: BLE001 — EncodeError and friends
        return PROTOBUF_LIMIT


def save_model(
    proto: onnx.ModelProto,
    path: Path,
    external_data: bool = False,
    large_model_bytes: int = LARGE_MODEL_BYTES,
) -> bool:
    """Write `proto` to `path` atomically; return whether weights went to `<name>.data` beside it.

    Weights go external when `external_data` is set or the model exceeds `large_model_bytes`. The
    files are written in a temporary folder beside `path` and renamed into place (data file first),
    so a failure leaves neither a partial model nor a stray data file. With external data the
    tensors of `proto` are converted in place. A proto whose weights were written out already
    (`weights_out`) is saved as the references it holds.
    """
    path = Path(path)
    use_external = external_data or serialized_size(proto) > large_model_bytes
    tmp_dir = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        tmp_model = tmp_dir / path.name
        if use_external:
            data_name = external_data_name(path)
            onnx.save_model(
                proto, str(tmp_model), save_as_external_data=True, all_tensors_to_one_file=True,
                location=data_name, size_threshold=1024,
            )
            os.chmod(tmp_dir / data_name, default_file_mode())  # onnx writes data files 0600, models 0644
            os.replace(tmp_dir / data_name, path.parent / data_name)
        else:
            onnx.save_model(proto, str(tmp_model))
        os.replace(tmp_model, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return use_external


ORT_OPS_IN_ONNX_DOMAIN = ("SimplifiedLayerNormalization",)  # ONNX Runtime's own ops that its optimizer writes in
# the default domain (RMSNorm fused by --optimize ort): the checker does not know them, ONNX Runtime runs them


def check_model(path: Path) -> None:
    """onnx.checker on the saved file (by path, so external data and >2 GB models are handled); ONNX Runtime's ops
    in the default domain are left to ONNX Runtime, which loads and runs the model in validation."""
    try:
        onnx.checker.check_model(str(path), full_check=False)
    except onnx.checker.ValidationError as exc:
        if not any(f"No Op registered for {op} " in str(exc) for op in ORT_OPS_IN_ONNX_DOMAIN):
            raise


def count_parameters(model: onnx.ModelProto) -> int:
    """Elements of all initializers and Constant-node tensors (external ones included, via their dims)."""
    return sum(int(np.prod(tensor.dims)) for tensor in _all_tensors(model))


def matrix_elements(model: onnx.ModelProto) -> int:
    """Elements of the floating-point matrices (rank-2 initializers and Constant-node tensors): the linear weights,
    their factors and embedding tables, without the biases, norms and shape constants a rewrite also touches."""
    floating = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16, onnx.TensorProto.DOUBLE}
    return sum(int(np.prod(tensor.dims)) for tensor in _all_tensors(model)
               if len(tensor.dims) == 2 and tensor.data_type in floating)
