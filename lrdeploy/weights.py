"""Weights read from a model's external data files on demand, never all held at once (a build bounded in memory).

A model loaded with its weights mapped (`onnx_io.load_model(path, map_weights=True)`) keeps its big tensors as
references into `<model>.onnx.data`:

    model.onnx.data ──mmap──► WeightFiles ──view──► MappedValues (a graph constant's values, read when asked)
                                   │                     └─► exported as the same reference (no bytes copied)
                                   └── release(): the pages read so far leave the process (read again if asked)

ONNX Runtime reads the same references from the model's folder itself (`create_session(..., external_dir=)`),
so a calibration graph is a few kilobytes, not a copy of the weights. Pages a decomposition read are released
after each group of layers, so the resident weights stay those of one group.
"""

from __future__ import annotations

import mmap
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx import external_data_helper

MAPPED_MIN_BYTES = 1 << 20  # smaller external tensors (biases, norms, shape constants) are read in at load


def external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    return {entry.key: entry.value for entry in tensor.external_data}


def mappable(tensor: onnx.TensorProto) -> bool:
    """An external tensor worth mapping: big, and of a dtype NumPy reads as is."""
    if not external_data_helper.uses_external_data(tensor):
        return False
    if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE):
        return False
    return tensor_bytes(tensor) >= MAPPED_MIN_BYTES


def tensor_bytes(tensor: onnx.TensorProto) -> int:
    """A tensor's size by its shape and type, wherever its bytes are (torch's exporter writes a file per tensor
    with no length)."""
    return int(np.prod(tensor.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


class WeightFiles:
    """Read-only maps of a model's external data files; `view(tensor)` is a tensor's values without copying."""

    def __init__(self, folder: Path, owned: tempfile.TemporaryDirectory | None = None):
        """`owned`: a temporary folder these files live in, removed with this object (an inline model's weights
        moved out to be mapped, `moved_out`)."""
        self.folder = Path(folder)
        self._maps: dict[str, mmap.mmap] = {}
        self._owned = owned

    def _map(self, location: str) -> mmap.mmap:
        if location not in self._maps:
            with open(self.folder / location, "rb") as handle:
                self._maps[location] = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
        return self._maps[location]

    def view(self, tensor: onnx.TensorProto) -> np.ndarray:
        entries = external_entries(tensor)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        count = int(np.prod(tensor.dims, dtype=np.int64))
        values = np.frombuffer(self._map(entries["location"]), dtype=dtype, count=count,
                               offset=int(entries.get("offset", 0)))
        return values.reshape(tuple(tensor.dims))

    def read_inline(self, tensor: onnx.TensorProto) -> None:
        """Put an external tensor's bytes into the tensor itself (small tensors, or before saving elsewhere)."""
        entries = external_entries(tensor)
        offset = int(entries.get("offset", 0))
        length = int(entries["length"]) if "length" in entries else None
        data = self._map(entries["location"])
        tensor.raw_data = data[offset: None if length is None else offset + length]
        del tensor.external_data[:]
        tensor.data_location = onnx.TensorProto.DEFAULT

    def release(self) -> None:
        """Drop the pages read so far from this process (they stay in the page cache, and are read back if a view
        is used again): what was read for one group of layers does not stay resident for the next."""
        for data in self._maps.values():
            data.madvise(mmap.MADV_DONTNEED)


class MappedValues(LazyValues):
    """A graph constant's values as a view into the mapped file, read each time they are asked for (never cached
    in the constant, so exporting the graph writes the reference, not the bytes)."""

    def __init__(self, tensor: onnx.TensorProto, files: WeightFiles):
        super().__init__(tensor)
        self.files = files

    def load(self) -> np.ndarray:
        return self.files.view(self.tensor)


def map_constants(graph: gs.Graph, files: WeightFiles) -> None:
    """Give each constant of `graph` that refers to external data mapped values."""
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Constant) and type(tensor._values) is LazyValues \
                and external_data_helper.uses_external_data(tensor._values.tensor):
            tensor._values = MappedValues(tensor._values.tensor, files)


def constant_array(constant: gs.Constant) -> np.ndarray:
    """A constant's values; a mapped one's are read from its file without being kept in the constant (gs caches
    values it loads, and would then export the bytes in place of the reference)."""
    if isinstance(constant._values, MappedValues):
        return constant._values.load()
    return np.asarray(constant.values)


def moved_out(model: onnx.ModelProto) -> WeightFiles | None:
    """Move `model`'s big inline tensors to a temporary data file and map them from there (None when it has none):
    a model without external data is then read on demand like one with it, instead of its weights being held by
    the proto and again by every array made from them."""
    from onnx import external_data_helper

    big = [t for t in model.graph.initializer if t.HasField("raw_data") and len(t.raw_data) >= MAPPED_MIN_BYTES]
    if not big:
        return None
    owned = tempfile.TemporaryDirectory(prefix="lrdeploy-weights-")
    for tensor in big:
        external_data_helper.set_external_data(tensor, "weights.data")
    external_data_helper.write_external_data_tensors(model, owned.name)
    files = WeightFiles(Path(owned.name), owned)
    for tensor in big:
        if not mappable(tensor):
            files.read_inline(tensor)
    return files
