"""The sensitivity graph cut where its errors act: the part after the cut, fed what the part before made once,
gives the whole injected model's outputs (a tiny Llama: attention mask, rotary tables, a tied LM head whose
transposed embedding is made from constants)."""

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from lrdeploy.calib.data import SampleSet, iter_batches, model_input_specs  # noqa: E402
from lrdeploy.passes.error_reach import cut_at_errors  # noqa: E402
from lrdeploy.passes.inject_error import error_injected_model  # noqa: E402
from lrdeploy.passes.moment_graph import inferred_types  # noqa: E402
from lrdeploy.stages.distortion import DistortionProbe  # noqa: E402
from lrdeploy.stages.inspect import inspect_model  # noqa: E402
from lrdeploy.stages.sensitivity import InjectedRuns  # noqa: E402
from tests.conftest import run_model  # noqa: E402
from tests.factories import tiny_llama_dir  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from lrdeploy.export.torch_onnx import export_hf

    folder = tmp_path_factory.mktemp("error_reach")
    export_hf(tiny_llama_dir(folder / "hf"), folder / "lm.onnx", task="text-generation")
    model = onnx.load(str(folder / "lm.onnx"))
    layers = [layer for layer in inspect_model(folder / "lm.onnx").layers if layer.eligible]
    rng = np.random.default_rng(0)
    samples = SampleSet({"input_ids": rng.integers(0, 512, (6, 16)), "attention_mask": np.ones((6, 16), np.int64)})
    samples.arrays["attention_mask"][1, 10:] = 0
    batches = list(iter_batches(samples, model_input_specs(model), 3, "attention_mask"))
    return model, layers, batches


def _errors(layers, error_inputs, seed):
    rng = np.random.default_rng(seed)
    feed = {}
    for layer, inputs in zip(layers, error_inputs):
        feed[inputs.weight] = (0.05 * rng.standard_normal((layer.d_in, layer.d_out))).astype(np.float32)
        feed[inputs.bias] = (0.05 * rng.standard_normal(layer.d_out)).astype(np.float32)
    return feed


@pytest.mark.parametrize("first", [0, 9])  # from block 0's first projection; from a projection of block 1
def test_runs_from_the_cut_give_the_whole_injected_models_outputs(llama, first):
    model, layers, batches = llama
    group = layers[first:first + 5]
    injected, error_inputs = error_injected_model(model, group)
    names = {name for inputs in error_inputs for name in (inputs.weight, inputs.bias)}
    cut = cut_at_errors(injected, names, inferred_types(model)[0])
    assert cut is not None and not names & set(cut.before_inputs)
    assert names <= set(cut.after_inputs)
    after_nodes, all_nodes = len(cut.after.graph.node), len(injected.graph.node)
    assert after_nodes < all_nodes
    if first:  # block 1 onward: block 0's nodes run once, not per variant
        assert after_nodes < 0.75 * all_nodes
    vocab_by_hidden = 512 * 64
    runs = InjectedRuns(injected, names, inferred_types(model)[0], batches, threads=1)
    for value in (v for before in runs.before for v in before.values()):  # the tied head's table is not passed
        assert value.size != vocab_by_hidden
    output_names = [output.name for output in model.graph.output]
    errors = _errors(group, error_inputs, seed=first)
    for batch, outputs in zip(batches, runs.outputs(output_names, errors)):
        for expected, got in zip(run_model(injected, {**batch, **errors}), outputs):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_measured_distortion_is_the_whole_models(llama):
    model, layers, batches = llama
    group = layers[9:12]
    injected, error_inputs = error_injected_model(model, group)
    names = {name for inputs in error_inputs for name in (inputs.weight, inputs.bias)}
    probe = DistortionProbe(model, batches, threads=1, mask_name="attention_mask")
    errors = _errors(group, error_inputs, seed=3)
    whole = probe.of_outputs([run_model(injected, {**batch, **errors}) for batch in batches])
    runs = InjectedRuns(injected, names, inferred_types(model)[0], batches, threads=1)
    cut = probe.of_outputs(runs.outputs(probe.names, errors))
    assert whole > 1e-4
    assert cut == pytest.approx(whole, rel=1e-4)
