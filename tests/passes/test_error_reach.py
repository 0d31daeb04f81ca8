"""The part of a model a group of layers reaches, run on the tensors one dense pass made, gives the whole injected
model's outputs (a tiny Llama: attention mask, rotary tables, a tied LM head whose transposed embedding is made
from constants); the sensitivity measured that way is the whole model's."""

import numpy as np
import pytest

pytest.importorskip("torch")

import lrdeploy.stages.error_runs as error_runs  # noqa: E402
from lrdeploy.passes.error_reach import plan_suffix  # noqa: E402
from lrdeploy.passes.inject_error import error_injected_model  # noqa: E402
from lrdeploy.passes.moment_graph import inferred_types  # noqa: E402
from lrdeploy.stages.distortion import DistortionProbe  # noqa: E402
from lrdeploy.stages.inspect import inspect_model  # noqa: E402
from tests.conftest import run_model  # noqa: E402
from tests.factories import tiny_llama_probe  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, path, batches = tiny_llama_probe(tmp_path_factory.mktemp("error_reach"))
    return model, [layer for layer in inspect_model(path).layers if layer.eligible], batches


def _errors(layers, error_inputs, seed):
    rng = np.random.default_rng(seed)
    feed = {}
    for layer, inputs in zip(layers, error_inputs):
        feed[inputs.weight] = (0.05 * rng.standard_normal((layer.d_in, layer.d_out))).astype(np.float32)
        feed[inputs.bias] = (0.05 * rng.standard_normal(layer.d_out)).astype(np.float32)
    return feed


@pytest.mark.parametrize("first", [0, 9])  # from block 0's first projection; from a projection of block 1
def test_the_suffix_fed_a_dense_pass_gives_the_whole_injected_models_outputs(llama, first):
    model, layers, batches = llama
    group = layers[first:first + 5]
    types, _ = inferred_types(model)
    plan = plan_suffix(model, group, types)
    assert plan is not None and len(plan.nodes) < len(model.graph.node)
    if first:  # block 0's nodes run once, in the dense pass, not per variant
        assert len(plan.nodes) < 0.75 * len(model.graph.node)
    assert group[0].input_name in plan.crossing  # the first layer reads what the dense pass made
    probe = DistortionProbe(model, batches, threads=1, mask_name="attention_mask", keep=plan.crossing, types=types)
    assert [o.name for o in model.graph.output] == probe.names  # the caller's model is left as it was
    for kept in probe.kept:  # the tied head's 64 × 512 table is made in the suffix, not passed
        assert all(value.size != 512 * 64 for value in kept.values())
    whole, error_inputs = error_injected_model(model, group)
    suffix, suffix_inputs = error_injected_model(plan.model(model, types), group)
    assert suffix_inputs == error_inputs
    errors = _errors(group, error_inputs, seed=first)
    for batch, kept in zip(batches, probe.kept):
        available = {**batch, **kept, **errors}
        got = run_model(suffix, {value.name: available[value.name] for value in suffix.graph.input})
        expected = run_model(whole, {**batch, **errors})
        for name, value in zip(plan.outputs, got):
            np.testing.assert_allclose(value, expected[probe.names.index(name)], rtol=1e-5, atol=1e-5)


def test_sensitivity_from_the_suffixes_is_the_whole_models(llama, monkeypatch):
    model, layers, batches = llama
    variants = [(layer, [((layer.name, seed), lambda layer=layer, seed=seed: (
                    0.05 * np.random.default_rng(seed).standard_normal((layer.d_in, layer.d_out)),
                    np.zeros(layer.d_out)))
                 for seed in (1, 2)]) for layer in layers]
    cut = error_runs.measure_layer_errors(model, variants, batches, threads=1, group_size=5, mask_name="attention_mask")
    monkeypatch.setattr(error_runs, "plan_suffix", lambda *args: None)
    whole = error_runs.measure_layer_errors(model, variants, batches, threads=1, group_size=5,
                                             mask_name="attention_mask")
    assert cut.keys() == whole.keys() and len(cut) == 2 * len(layers)
    assert min(whole.values()) > 1e-5
    for key, loss in whole.items():
        assert cut[key] == pytest.approx(loss, rel=1e-4)


def test_layers_with_biases_sharing_an_input_read_it_once():
    """Q, K and V with biases after a pre-LayerNorm (ViT): their outputs are their Adds', so the norm's output is
    read only by the errors' MatMuls — one input of the suffix, which ONNX Runtime loads."""
    from lrdeploy.passes.linear_layers import find_linear_layers
    from lrdeploy.runtime.onnxruntime import create_session
    from tests import models
    import onnx_graphsurgeon as gs

    model = models.transformer(layers=1, pre_ln=True)
    layers = [layer for layer in find_linear_layers(gs.import_onnx(model)) if layer.eligible][:3]
    assert len({layer.input_name for layer in layers}) == 1 and all(layer.bias is not None for layer in layers)
    types, _ = inferred_types(model)
    plan = plan_suffix(model, layers, types)
    assert plan.inputs.count(layers[0].input_name) == 1
    injected, _ = error_injected_model(plan.model(model, types), layers)
    create_session(injected, threads=1)


def test_a_graph_output_that_later_nodes_read_is_fed_from_the_dense_pass(monkeypatch):
    """CLIP's text_embeds is an output and the input of the logits: it crosses into the suffix as an output."""
    import onnx_graphsurgeon as gs
    from onnx import TensorProto, helper, numpy_helper

    from lrdeploy.passes.linear_layers import find_linear_layers

    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["embeds"]), helper.make_node("MatMul", ["embeds", "w2"], ["logits"])]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
        [helper.make_tensor_value_info(name, TensorProto.FLOAT, ["batch", 64]) for name in ("embeds", "logits")],
        [numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), name) for name in ("w1", "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    layers = [layer for layer in find_linear_layers(gs.import_onnx(model)) if layer.output_name == "logits"]
    plan = plan_suffix(model, layers, inferred_types(model)[0])
    assert plan.crossing == ("embeds",) and plan.outputs == ("logits",)
    batches = [{"x": rng.standard_normal((4, 64)).astype(np.float32)}]
    error = 0.1 * rng.standard_normal((64, 64))
    variants = [(layers[0], [("w2", lambda: (error, np.zeros(64)))])]
    cut = error_runs.measure_layer_errors(model, variants, batches, threads=1)
    monkeypatch.setattr(error_runs, "plan_suffix", lambda *args: None)
    assert cut["w2"] == pytest.approx(error_runs.measure_layer_errors(model, variants, batches, threads=1)["w2"],
                                      rel=1e-6)
    assert cut["w2"] > 1e-4
