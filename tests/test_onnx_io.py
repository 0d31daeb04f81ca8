"""Loading and saving models: external data, unsafe locations, atomic writes."""

import os

import numpy as np
import onnx
import pytest

from lrdeploy.errors import ModelLoadError
from lrdeploy.onnx_io import count_parameters, load_model, save_model
from tests import models


def _save_external(model, path):
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=0)


def test_external_data_model_loads_with_weights(tmp_path):
    path = tmp_path / "m.onnx"
    _save_external(models.matmul_add(), path)
    loaded = load_model(path)
    assert loaded.external_data and loaded.external_files == [(tmp_path / "m.onnx.data").resolve()]
    weight = onnx.numpy_helper.to_array(next(i for i in loaded.proto.graph.initializer if i.name == "W"))
    np.testing.assert_array_equal(weight, models.random_weight(64, 96, 0))


def test_external_location_outside_model_folder_is_refused(tmp_path):
    inner = tmp_path / "models"
    inner.mkdir()
    _save_external(models.matmul_add(), tmp_path / "m.onnx")
    model = onnx.load(str(tmp_path / "m.onnx"), load_external_data=False)
    for tensor in model.graph.initializer:
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = "../m.onnx.data"
    onnx.save_model(model, str(inner / "evil.onnx"))
    with pytest.raises(ModelLoadError, match=r"points to external data '../m.onnx.data' outside the model's folder"):
        load_model(inner / "evil.onnx")


def test_missing_external_data_file(tmp_path):
    _save_external(models.matmul_add(), tmp_path / "m.onnx")
    os.remove(tmp_path / "m.onnx.data")
    with pytest.raises(ModelLoadError, match=r"external data file 'm.onnx.data' for tensor '.*' is missing"):
        load_model(tmp_path / "m.onnx")


@pytest.mark.parametrize("content, message", [
    (None, r"model file .* does not exist; check the path"),
    (b"definitely not protobuf \xff\xfe", r"is not a valid ONNX model \(\w+\); pass a .onnx file"),
    (b"", r"is not a valid ONNX model \(it has no graph nodes\)"),
])
def test_not_a_model(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelLoadError, match=message):
        load_model(path)


def test_save_goes_external_when_large_or_asked(tmp_path):
    model = models.matmul_add()
    assert save_model(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "a.onnx") is False
    assert not (tmp_path / "a.onnx.data").exists()
    assert save_model(onnx.ModelProto.FromString(model.SerializeToString()), tmp_path / "b.onnx",
                      large_model_bytes=1000) is True
    assert (tmp_path / "b.onnx.data").stat().st_size >= 64 * 96 * 4
    reloaded = load_model(tmp_path / "b.onnx")
    assert reloaded.external_data and count_parameters(reloaded.proto) == count_parameters(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.onnx", "b.onnx", "b.onnx.data"]  # no temp left


def test_failed_save_leaves_nothing(tmp_path):
    with pytest.raises(AttributeError):
        save_model("not a model", tmp_path / "x.onnx")  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []
