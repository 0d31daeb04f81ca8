"""Validation compares vocabulary-wide outputs a sample at a time (Polygraphy copies what it compares)."""

import numpy as np

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
