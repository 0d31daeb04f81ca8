"""A rewritten graph's big constants written to the output's external data file one at a time, before export.

    graph constants ─► for each big one, in graph order:   bytes ─append─► <model>.onnx.data (page-aligned)
       (factors: views of decompositions;                     constant ─► a reference to them (LazyValues):
        untouched weights: MappedValues)                      its arrays freed, when nothing else holds them
    gs.export_onnx(graph) ─► a proto of references: kilobytes, saved as it is

Exporting a graph copies every constant's bytes into the proto, and saving with external data needs them all
there: a 1.1B-parameter model's rewrite then held the decompositions, the proto's copy of the factors and the
input's untouched weights at once (10 GB for 4 GB of weights). Written here instead, each constant leaves memory
as it is written. onnx's own external-data writer works only on an inline proto, so this one is ours: the same
fields (location, offset, length), offsets aligned to the page for ONNX Runtime's memory mapping.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import external_data_helper
from onnx_graphsurgeon.ir.tensor import LazyValues

from lrdeploy.weights import MAPPED_MIN_BYTES, WeightFiles, constant_array

ALIGNMENT = 4096


class DataFileWriter:
    """Appends tensors to one external data file and gives each the reference a TensorProto carries."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._handle = open(self.path, "xb")  # a new file in this run's staging folder, never an existing one

    def write(self, name: str, values: np.ndarray) -> onnx.TensorProto:
        """`values` appended (C order, little-endian as ONNX stores them); a TensorProto referring to them."""
        offset = -self._handle.tell() % ALIGNMENT + self._handle.tell()
        self._handle.seek(offset)
        array = np.ascontiguousarray(values)
        self._handle.write(memoryview(array.astype(array.dtype.newbyteorder("<"), copy=False)).cast("B"))
        tensor = onnx.TensorProto(name=name, dims=array.shape,
                                  data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
        tensor.data_location = onnx.TensorProto.EXTERNAL
        for key, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(array.nbytes))):
            tensor.external_data.add(key=key, value=value)
        return tensor

    def close(self) -> None:
        self._handle.close()


def graph_constants(graph: gs.Graph) -> Iterator[gs.Constant]:
    """Every constant of `graph` and its subgraphs, once each, in node order."""
    seen: set[int] = set()
    for node in graph.nodes:
        for tensor in node.inputs:
            if isinstance(tensor, gs.Constant) and id(tensor) not in seen:
                seen.add(id(tensor))
                yield tensor
        for attribute in node.attrs.values():
            if isinstance(attribute, gs.Graph):
                yield from graph_constants(attribute)


def write_constants_out(graph: gs.Graph, data_file: Path, mapped: WeightFiles | None) -> None:
    """Write every constant of `graph` of at least `MAPPED_MIN_BYTES` to `data_file` and make it a reference to
    what was written; smaller ones stay inline. `mapped`: the input's weight files, whose pages read for a copy
    are released as it goes."""
    writer = DataFileWriter(data_file)
    try:
        for constant in graph_constants(graph):
            values = _constant_values(constant, mapped)
            if values.nbytes < MAPPED_MIN_BYTES or values.dtype == object:
                continue
            reference = writer.write(constant.name, values)
            del values
            constant._values = LazyValues(reference)  # exported as this reference, the bytes never in the proto
            if mapped is not None:
                mapped.release()
    finally:
        writer.close()


def _constant_values(constant: gs.Constant, mapped: WeightFiles | None) -> np.ndarray:
    """A constant's values; one still referring to the input's external data is read from its mapped file."""
    if type(constant._values) is LazyValues and mapped is not None \
            and external_data_helper.uses_external_data(constant._values.tensor):
        return mapped.view(constant._values.tensor)
    return constant_array(constant)
