"""How many calibration samples each measured option runs on: 16, or for a causal LM the windows that hold 512
tokens; what the user asks for otherwise."""

import numpy as np
import onnx
from onnx import TensorProto, helper

from lrdeploy.calib.data import SampleSet
from lrdeploy.stages.samples import BuildSamples, is_causal_lm


def _graph_model(output_name: str, output_dims: list) -> onnx.ModelProto:
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info(output_name, TensorProto.FLOAT, output_dims)
    node = helper.make_node("Cast", ["input_ids"], [output_name], to=TensorProto.FLOAT)  # shapes are what counts
    return helper.make_model(helper.make_graph([node], "g", [ids], [out]))


def _samples(count: int, window: int) -> BuildSamples:
    calib = SampleSet({"input_ids": np.zeros((count, window), np.int64)})
    return BuildSamples(calib, calib, "calib", "calib", [])


LM = _graph_model("logits", ["batch", "sequence", 49152])
ENCODER = _graph_model("last_hidden_state", ["batch", "sequence", 384])


def test_an_lm_is_probed_on_the_windows_that_hold_128_tokens():
    assert is_causal_lm(LM) and not is_causal_lm(ENCODER)
    assert not is_causal_lm(_graph_model("logits", ["batch", 2]))  # a classifier's logits
    assert _samples(64, 128).probe(None, LM).count == 1
    assert _samples(64, 50).probe(None, LM).count == 3  # ⌈128 / 50⌉
    assert _samples(64, 1024).probe(None, LM).count == 1
    assert _samples(64, 4).probe(None, LM).count == 16  # never more than the default
    assert _samples(2, 50).probe(None, LM).count == 2  # never more than calibration has


def test_other_models_get_16_samples_and_a_request_is_kept():
    assert _samples(64, 128).probe(None, ENCODER).count == 16
    assert _samples(64, 128).probe(7, LM).count == 7
    assert _samples(64, 128).probe(7, ENCODER).count == 7
