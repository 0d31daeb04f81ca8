"""Moments collected inside ONNX Runtime equal a float64 numpy reference over the real (unpadded) tokens."""

import numpy as np
import onnx_graphsurgeon as gs
import pytest

from lrdeploy.calib.data import SampleSet, iter_batches, model_input_specs
from lrdeploy.calib.stats import TensorRequest, collect_joint_moments, collect_moments, count_passes, group_requests
from lrdeploy.errors import CalibrationDataError
from lrdeploy.passes.moment_graph import MomentRequest
from tests import models

TENSOR = "layer0/output/LayerNorm"  # block 0 output = input of block 1 Q/K/V, [batch, seq, 64]


def _real_rows(model, inputs, tensor):
    """The tensor's values at the positions where attention_mask is 1, in float64 [positions, d]."""
    import onnxruntime as ort

    graph = gs.import_onnx(model)
    graph.outputs = [graph.tensors()[tensor].to_variable(dtype=np.float32)]
    session = ort.InferenceSession(gs.export_onnx(graph.cleanup()).SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run(None, inputs)[0].astype(np.float64)
    return values[inputs["attention_mask"].astype(bool)]


def _reference(model, inputs, tensor):
    """Σx, Σxxᵀ and count over positions where attention_mask is 1, from the tensor's full values."""
    rows = _real_rows(model, inputs, tensor)
    return rows.shape[0], rows.sum(0), rows.T @ rows


@pytest.fixture(scope="module")
def setup():
    model = models.transformer(layers=2)
    inputs = models.transformer_inputs(40, seq=16)
    return model, inputs, SampleSet(inputs), model_input_specs(model)


def test_masked_moments_match_reference(setup):
    model, inputs, samples, specs = setup
    moments = collect_moments(model, [TensorRequest(TENSOR, 64)], lambda: iter_batches(samples, specs, 8, "attention_mask"),
                              mask_name="attention_mask", threads=1)[TENSOR]
    count, total, gram = _reference(model, inputs, TENSOR)
    assert moments.count == count == inputs["attention_mask"].sum()
    np.testing.assert_allclose(moments.total, total, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(moments.gram, gram, rtol=1e-4, atol=1e-2)


def test_without_mask_every_position_counts(setup):
    model, inputs, samples, specs = setup
    moments = collect_moments(model, [TensorRequest(TENSOR, 64)], lambda: iter_batches(samples, specs, 40),
                              threads=1)[TENSOR]
    assert moments.count == 40 * 16


def test_length_bucketing_cuts_padding_without_changing_statistics(setup):
    model, inputs, samples, specs = setup
    batches = list(iter_batches(samples, specs, 8, "attention_mask"))
    assert sum(b["input_ids"].size for b in batches) < inputs["input_ids"].size
    lengths = [b["attention_mask"].sum(1) for b in batches]
    assert all(b["attention_mask"].shape[1] == l.max() for b, l in zip(batches, lengths))  # cut to the longest
    assert [l.max() for l in lengths] == sorted(l.max() for l in lengths)  # bucketed by length
    assert sum(int(b["attention_mask"].sum()) for b in batches) == int(inputs["attention_mask"].sum())
    unbucketed = collect_moments(model, [TensorRequest(TENSOR, 64)], lambda: [inputs], mask_name="attention_mask",
                                 threads=1)[TENSOR]
    bucketed = collect_moments(model, [TensorRequest(TENSOR, 64)], lambda: batches, mask_name="attention_mask",
                               threads=1)[TENSOR]
    np.testing.assert_allclose(bucketed.gram, unbucketed.gram, rtol=1e-4, atol=1e-5 * np.abs(unbucketed.gram).max())


def test_groups_bound_gram_memory_and_give_same_result(setup):
    model, inputs, samples, specs = setup
    requests = [TensorRequest(TENSOR, 64), TensorRequest("layer0/attention/LayerNorm", 64), TensorRequest(TENSOR, 64),
                TensorRequest("layer0/gelu/Mul2", 256), TensorRequest("layer1/context/Reshape", 64)]
    budget = 4 * 256 * 256  # one 256-wide float32 Gram
    assert [len(g) for g in group_requests(requests, budget)] == [3, 1, 1]
    assert count_passes(requests, budget) == 3  # the duplicate is collected once: [T, A], [G], [C]
    one_pass = collect_moments(model, requests, lambda: [inputs], mask_name="attention_mask", threads=1)
    several = collect_moments(model, requests, lambda: [inputs], mask_name="attention_mask",
                              max_gram_bytes=4 * 64 * 64, threads=1)
    for name in one_pass:
        np.testing.assert_allclose(several[name].gram, one_pass[name].gram, rtol=1e-6)


def test_fp16_activations_are_accumulated_in_float(tmp_path):
    model = models.matmul_add(dtype=np.float16)
    x = np.random.default_rng(0).standard_normal((300, 64)).astype(np.float16) * 50
    moments = collect_moments(model, [TensorRequest("x", 64)], lambda: [{"x": x}], threads=1)["x"]
    reference = x.astype(np.float64).T @ x.astype(np.float64)
    np.testing.assert_allclose(moments.gram, reference, rtol=1e-5, atol=1e-6 * np.abs(reference).max())
    assert moments.gram.dtype == np.float64


def test_joint_moments_match_reference(setup):
    """Σy and Σxyᵀ of a (source, target) pair read at the same real positions."""
    model, inputs, samples, specs = setup
    target = "layer0/gelu/Mul2"  # the FFN activation, 256 wide
    (joint,) = collect_joint_moments(model, [MomentRequest(TENSOR, 64, target, 256)],
                                     iter_batches(samples, specs, 8, "attention_mask"), "attention_mask", threads=1)
    x, y = _real_rows(model, inputs, TENSOR), _real_rows(model, inputs, target)
    assert joint.source.count == x.shape[0]
    np.testing.assert_allclose(joint.source.gram, x.T @ x, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(joint.target_total, y.sum(0), rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(joint.cross_gram, x.T @ y, rtol=1e-4, atol=1e-2)
    np.testing.assert_allclose(joint.cross_covariance, np.cov(x.T, y.T, bias=True)[:64, 64:], rtol=1e-3, atol=1e-4)


def test_inputs_the_model_cannot_run_are_a_calibration_error(setup):
    model, inputs, _, _ = setup
    bad = {"input_ids": inputs["input_ids"][:, :5], "attention_mask": inputs["attention_mask"]}  # 5 vs 16 tokens
    with pytest.raises(CalibrationDataError, match=r"ONNX Runtime could not run the model on the calibration inputs"):
        collect_moments(model, [TensorRequest(TENSOR, 64)], lambda: [bad], mask_name="attention_mask", threads=1)
    with pytest.raises(CalibrationDataError, match=r"check the input shapes and values"):
        collect_joint_moments(model, [MomentRequest(TENSOR, 64, TENSOR, 64)], [bad], "attention_mask", threads=1)
