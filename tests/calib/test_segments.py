"""Calibration segment by segment gives the statistics of whole-model passes: a tiny Llama (attention mask,
rotary tables, grouped-query attention, one padded window) cut into a segment per weighted node."""

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from lrdeploy.calib.data import SampleSet, iter_batches, model_input_specs  # noqa: E402
from lrdeploy.calib.segments import SegmentPlan  # noqa: E402
from lrdeploy.passes.subgraph import subgraph_model  # noqa: E402
from lrdeploy.calib.stats import TensorRequest, collect_moments  # noqa: E402
from lrdeploy.stages.inspect import inspect_model  # noqa: E402
from tests.factories import tiny_llama_dir  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from lrdeploy.export.torch_onnx import export_hf

    folder = tmp_path_factory.mktemp("segments")
    export_hf(tiny_llama_dir(folder / "hf"), folder / "lm.onnx", task="text-generation")
    return folder / "lm.onnx"


def test_segments_collect_the_moments_of_whole_model_passes(llama):
    model = onnx.load(str(llama))
    layers = [layer for layer in inspect_model(llama).layers if layer.eligible]
    requests = [TensorRequest(layer.input_name, layer.d_in) for layer in layers]
    rng = np.random.default_rng(0)
    samples = SampleSet({"input_ids": rng.integers(0, 512, (10, 16)), "attention_mask": np.ones((10, 16), np.int64)})
    samples.arrays["attention_mask"][2, 11:] = 0  # padding is not counted, in any segment
    specs = model_input_specs(model)

    def batches():
        return iter_batches(samples, specs, 4, "attention_mask")

    whole = collect_moments(model, requests, batches, "attention_mask", threads=1)
    plan = SegmentPlan.of(model, requests, "attention_mask", max_gram_bytes=1 << 30, max_weight_bytes=1)
    assert plan is not None and len(plan.segments) >= len({r.name for r in requests})
    weights = {t.name for t in model.graph.initializer if len(t.dims) == 2}
    for segment in plan.segments:  # no segment's session holds more than one weighted node's matrices
        held = {t.name for t in subgraph_model(model, segment.nodes, segment.inputs, segment.outputs, plan.types).graph.initializer} & weights
        assert len(held) <= 1
    segmented = {}
    for group in plan.groups(batches, threads=1):
        segmented.update(group.collect())
    assert segmented.keys() == whole.keys()
    for name, moments in whole.items():
        assert segmented[name].count == moments.count == 10 * 16 - 5
        np.testing.assert_allclose(segmented[name].total, moments.total, rtol=1e-5, atol=1e-4)
        np.testing.assert_allclose(segmented[name].gram, moments.gram, rtol=1e-5, atol=1e-3)
