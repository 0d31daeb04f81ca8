"""Validation compares vocabulary-wide outputs a sample at a time (Polygraphy copies what it compares) and runs
batches with wide outputs in parts."""

import numpy as np
import pytest

from lrdeploy.stages.validate import per_sample


def test_outputs_are_compared_a_sample_at_a_time_when_the_batch_comes_first():
    reference = {"logits": np.arange(24.0).reshape(3, 2, 4), "pooled": np.ones((3, 5))}
    outputs = {name: value + 1 for name, value in reference.items()}
    pairs = list(per_sample(reference, outputs))
    assert len(pairs) == 3
    for index, (expected, actual) in enumerate(pairs):
        np.testing.assert_array_equal(expected["logits"], reference["logits"][index:index + 1])
        np.testing.assert_array_equal(actual["pooled"], outputs["pooled"][index:index + 1])
        assert np.shares_memory(expected["logits"], reference["logits"])  # views, not copies


def test_outputs_without_a_common_batch_axis_are_compared_whole():
    reference = {"a": np.zeros((3, 2)), "b": np.zeros((4,))}
    pairs = list(per_sample(reference, dict(reference)))
    assert len(pairs) == 1 and pairs[0][0]["b"].shape == (4,)


def _wide_model(path, batch, weight: np.ndarray) -> None:
    """x (batch × 8) → x @ weight (8 × 1000): 4000 output bytes per sample."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])], "wide",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 1000])],
        [numpy_helper.from_array(weight.astype(np.float32), "w")])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)


def test_batches_with_wide_outputs_run_in_parts_with_the_same_figures(tmp_path, monkeypatch):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    import lrdeploy.stages.validate as validate

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(8, 1000))
    _wide_model(tmp_path / "a.onnx", "batch", weight)
    _wide_model(tmp_path / "b.onnx", "batch", weight + 0.01 * rng.normal(size=weight.shape))
    feeds = [{"x": rng.normal(size=(5, 8)).astype(np.float32)} for _ in range(2)]
    whole = validate.compare_models(tmp_path / "a.onnx", tmp_path / "b.onnx", feeds, 1e-3, 1e-3, neighbours=3)

    monkeypatch.setattr(validate, "MAX_RUN_OUTPUT_BYTES", 10_000)
    with OnnxrtRunner(SessionFromOnnx(str(tmp_path / "a.onnx"))) as runner:
        assert validate.rows_per_run(runner, feeds[0]) == 2  # 10000 // 4000
    parts = validate.in_parts(feeds, 2)
    assert [part["x"].shape[0] for part in parts] == [2, 2, 1, 2, 2, 1]
    np.testing.assert_array_equal(np.concatenate([part["x"] for part in parts]), np.concatenate([f["x"] for f in feeds]))
    split = validate.compare_models(tmp_path / "a.onnx", tmp_path / "b.onnx", feeds, 1e-3, 1e-3, neighbours=3)
    assert split.samples == whole.samples == 10
    for field in ("cosine_mean", "cosine_p5", "rel_l2", "max_abs", "topk_agreement"):
        assert getattr(split.outputs["y"], field) == pytest.approx(getattr(whole.outputs["y"], field), rel=1e-6)


def test_a_static_batch_axis_is_never_split(tmp_path, monkeypatch):
    from polygraphy.backend.onnxrt import OnnxrtRunner, SessionFromOnnx

    import lrdeploy.stages.validate as validate

    monkeypatch.setattr(validate, "MAX_RUN_OUTPUT_BYTES", 10_000)
    _wide_model(tmp_path / "a.onnx", 5, np.ones((8, 1000)))
    with OnnxrtRunner(SessionFromOnnx(str(tmp_path / "a.onnx"))) as runner:
        assert validate.rows_per_run(runner, {"x": np.ones((5, 8), np.float32)}) == 5
