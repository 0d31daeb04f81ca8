"""Sessions from in-memory models: bytes under protobuf's 2 GB limit, external data in a temporary folder past it
(the caller's proto keeps its weights either way)."""

import numpy as np
import onnx

from lrdeploy.runtime import onnxruntime as ort_runtime
from tests import models


def test_a_model_past_the_limit_runs_from_external_data_and_keeps_its_weights(monkeypatch):
    model = models.transformer(layers=1)
    before = [bytes(i.raw_data) or i.SerializeToString() for i in model.graph.initializer]
    feed = models.transformer_inputs(4)
    expected = ort_runtime.create_session(model).run(None, feed)
    monkeypatch.setattr(ort_runtime, "PROTOBUF_LIMIT_BYTES", 1000)  # every model is "past 2 GB" now
    assert ort_runtime._serialized_under_limit(model) is None
    got = ort_runtime.create_session(model).run(None, feed)
    for want, have in zip(expected, got):
        np.testing.assert_array_equal(have, want)
    assert [bytes(i.raw_data) or i.SerializeToString() for i in model.graph.initializer] == before
    assert not any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
