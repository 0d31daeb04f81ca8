"""Measured at block ends (a tiny Llama, as torch exports it): the rest of a block gives the injected model's
stream at the block's end; a change fed there gives the whole model's outputs, so a dropped block and a side's
calibration variant are measured exactly; every other variant is its squared change there times its side's gain."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest

pytest.importorskip("torch")

from lrdeploy.calib.data import SampleSet, iter_batches, model_input_specs  # noqa: E402
from lrdeploy.passes.error_reach import plan_suffix  # noqa: E402
from lrdeploy.passes.inject_error import error_injected_model  # noqa: E402
from lrdeploy.passes.moment_graph import inferred_types  # noqa: E402
from lrdeploy.planning.blocks import block_ends, find_block_parts  # noqa: E402
from lrdeploy.settings.build import BuildConfig  # noqa: E402
from lrdeploy.stages.block_reach import measure_at_block_ends  # noqa: E402
from lrdeploy.stages.distortion import DistortionProbe  # noqa: E402
from lrdeploy.stages.error_runs import measure_layer_errors  # noqa: E402
from lrdeploy.stages.inspect import inspect_model  # noqa: E402
from tests.conftest import run_model  # noqa: E402
from tests.factories import tiny_llama_dir, tiny_llama_probe  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    model, path, batches = tiny_llama_probe(tmp_path_factory.mktemp("block_reach"))
    config = BuildConfig.from_options(model=path, plan="unified", cache_dir=None)
    parts = find_block_parts(config, gs.import_onnx(model), inspect_model(path).layers)
    assert len(parts) == 2 and all(part.block is not None for part in parts)
    return model, parts, batches


def _noise(layer, seed, scale=0.05):
    def make():
        rng = np.random.default_rng(seed)
        return scale * rng.standard_normal((layer.d_in, layer.d_out)), np.zeros(layer.d_out)
    return make


def test_the_rest_of_a_block_gives_the_injected_models_stream_at_its_end(llama):
    model, parts, batches = llama
    part = parts[0]
    layers = [*part.attention.projections, part.ffn.gate]
    types, _ = inferred_types(model)
    plan = plan_suffix(model, layers, types, part.block.output_name)
    assert plan is not None and plan.outputs == (part.block.output_name,)
    assert len(plan.nodes) < 0.5 * len(model.graph.node)  # block 1 and the LM head are not in it
    probe = DistortionProbe(model, batches, threads=1, mask_name="attention_mask", keep=plan.crossing,
                            types=types)
    suffix, inputs = error_injected_model(plan.model(model, types), layers)
    whole, _ = error_injected_model(model, layers)
    whole.graph.output.add(name=part.block.output_name).type.CopyFrom(types[part.block.output_name])
    errors = {}
    for layer, names in zip(layers, inputs):
        weight, bias = _noise(layer, 3)()
        errors.update({names.weight: weight.astype(np.float32), names.bias: bias.astype(np.float32)})
    for batch, kept in zip(batches, probe.kept):
        available = {**batch, **kept, **errors}
        got = run_model(suffix, {value.name: available[value.name] for value in suffix.graph.input})[0]
        expected = run_model(whole, {**batch, **errors})[-1]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_a_horizon_the_errors_can_go_around_is_refused(llama):
    model, parts, _ = llama
    types, _ = inferred_types(model)
    later = parts[1].attention.output  # block 1's layers reach the logits without passing block 0's end
    assert plan_suffix(model, [later], types, parts[0].block.output_name) is None


def test_drops_and_calibrations_are_exact_and_the_rest_scaled(llama):
    model, parts, batches = llama
    down = [part.ffn.down for part in parts]
    output = [part.attention.output for part in parts]
    # one variant on each side of each block: the side's calibration is that variant, measured at the outputs
    variants = [(layer, [(layer.name, _noise(layer, seed))]) for seed, layer in enumerate(down + output)]
    drops = [(("drop", index), index) for index in range(len(parts))]
    steps = []
    losses = measure_at_block_ends(model, block_ends(parts), variants, batches, threads=1, mask_name="attention_mask",
                                   drops=drops, steps=lambda total: (steps.append(total), lambda: None)[1])
    assert set(losses) == {layer.name for layer, _ in variants} | {key for key, _ in drops}
    sides = 2 * len(parts)  # each side's calibration runs at its block's end and at the outputs
    assert steps == [len(variants) + 2 * sides + len(drops)]
    exact = measure_layer_errors(model, variants, batches, threads=1, mask_name="attention_mask")
    for name, loss in exact.items():
        assert losses[name] == pytest.approx(loss, rel=1e-3)
    whole = DistortionProbe(model, batches, 1, "attention_mask")
    for (key, index), part in zip(drops, parts):
        from lrdeploy.passes.compose import StructuredCuts

        dropped = StructuredCuts(dropped=[(part.block, part.block.weighted_layers(part.layers), 0.0)])
        assert losses[key] == pytest.approx(whole.of_model(dropped.applied_to(model)), rel=1e-3)
        assert losses[key] > 1e-3


def test_a_sides_variants_are_scaled_by_its_gain(llama):
    """Two sizes of the same error on one layer: the gain makes the larger one's loss its squared change times
    the smaller's loss per squared change (four times the change, four times the loss)."""
    model, parts, batches = llama
    layer = parts[1].ffn.down
    small, large = _noise(layer, 7, 0.01), _noise(layer, 7, 0.02)
    variants = [(layer, [("large", large), ("small", small)])]  # the calibration is the first (middle) one
    losses = measure_at_block_ends(model, block_ends(parts), variants, batches, threads=1, mask_name="attention_mask")
    exact = measure_layer_errors(model, variants, batches, threads=1, mask_name="attention_mask")
    assert losses["large"] == pytest.approx(exact["large"], rel=1e-3)
    assert losses["small"] == pytest.approx(losses["large"] / 4, rel=1e-3)  # squared change: exactly a quarter
    assert losses["small"] == pytest.approx(exact["small"], rel=0.2)  # KL is near quadratic in a small change


def test_a_kv_cache_model_is_measured_at_its_block_ends_too(tmp_path):
    """With its KV cache (Optimum's names) a block cannot be dropped (its keys and values are outputs), but its
    end is still where every scored way passes: the present outputs are not scored."""
    from lrdeploy.calib.data import with_prefill_inputs
    from lrdeploy.export.torch_onnx import export_hf

    export_hf(tiny_llama_dir(tmp_path / "hf"), tmp_path / "kv.onnx", task="text-generation-with-past")
    model = onnx.load(str(tmp_path / "kv.onnx"))
    config = BuildConfig.from_options(model=tmp_path / "kv.onnx", plan="unified", cache_dir=None)
    parts = find_block_parts(config, gs.import_onnx(model), inspect_model(tmp_path / "kv.onnx").layers)
    assert all(part.block is None and part.end is not None for part in parts)
    specs = model_input_specs(model)
    ids = np.random.default_rng(1).integers(0, 512, (4, 16))
    samples = with_prefill_inputs(SampleSet({"input_ids": ids, "attention_mask": np.ones_like(ids)}), specs)
    batches = list(iter_batches(samples, specs, 2, "attention_mask"))
    layer = parts[0].attention.projections[1]  # K: it writes the cache as well as the attention
    variants = [(layer, [("k", _noise(layer, 5))])]
    losses = measure_at_block_ends(model, block_ends(parts), variants, batches, threads=1, mask_name="attention_mask")
    exact = measure_layer_errors(model, variants, batches, threads=1, mask_name="attention_mask")
    assert losses["k"] == pytest.approx(exact["k"], rel=1e-3) and exact["k"] > 1e-5


@pytest.mark.parametrize("reach, lm, expected", [("auto", True, True), ("auto", False, False),
                                                  ("output", True, False), ("block", False, True)])
def test_the_reach_is_block_ends_for_a_causal_lm_unless_asked(tmp_path, llama, reach, lm, expected):
    from lrdeploy.stages.sensitivity import reaches_block_ends
    from tests import models

    model = llama[0] if lm else models.transformer()
    config = BuildConfig.from_options(model=tmp_path / "m.onnx", sensitivity_reach=reach, cache_dir=None)
    assert reaches_block_ends(config, model) is expected
