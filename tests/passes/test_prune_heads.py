"""Removing attention heads: matching, exactness for heads that contribute nothing, shape constants per block."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from lrdeploy.calib.stats import TensorRequest, collect_moments
from lrdeploy.lowrank.neurons import cut_groups
from lrdeploy.passes.linear_layers import find_linear_layers
from lrdeploy.passes.prune_heads import find_attention_blocks, prune_heads
from tests import models
from tests.conftest import built_cut, run_model

INPUTS = models.transformer_inputs(48)


def _silence_head(model, layer, head, head_dim=16):
    """Zero the output projection's rows of one head: that head then contributes nothing."""
    for init in model.graph.initializer:
        if init.name == f"layer{layer}/attention/output.weight":
            weight = numpy_helper.to_array(init).copy()
            weight[head * head_dim:(head + 1) * head_dim] = 0
            init.CopyFrom(numpy_helper.from_array(weight, init.name))
    return model


def _pruned(model, keep, only=None):
    """`model` with `keep` heads left in each block (or in block `only`), the heads chosen from its moments."""
    graph = gs.import_onnx(model)
    blocks = find_attention_blocks(find_linear_layers(graph), heads=4)
    blocks = blocks if only is None else [blocks[only]]
    moments = collect_moments(model, [TensorRequest(b.output.input_name, b.output.d_in) for b in blocks],
                              lambda: [INPUTS], "attention_mask", threads=1)
    kept = []
    for block in blocks:
        heads, cut = cut_groups(moments[block.output.input_name], block.output.weight, block.output.bias, block.heads,
                                keep)
        prune_heads(graph, block, heads, cut)
        kept.append(heads)
    pruned = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(pruned)
    return pruned, kept


def test_blocks_are_found_in_model_order():
    graph = gs.import_onnx(models.transformer(layers=2))
    blocks = find_attention_blocks(find_linear_layers(graph), heads=4)
    assert [(*(p.name for p in b.projections), b.output.name, b.head_dim) for b in blocks] == [
        (*(f"layer{i}/attention/{p}/MatMul" for p in ("query", "key", "value", "output")), 16) for i in range(2)]


def test_heads_that_contribute_nothing_are_removed_exactly():
    model = _silence_head(_silence_head(models.transformer(layers=2), 0, 3), 1, 1)
    pruned, kept = _pruned(model, 3)
    assert kept == [[0, 1, 2], [0, 2, 3]]
    shapes = {i.name: tuple(i.dims) for i in pruned.graph.initializer}
    assert shapes["layer0/attention/output/MatMul/heads/query/weight"] == (64, 48)
    assert shapes["layer0/attention/output/MatMul/heads/output/weight"] == (48, 64)
    split = {i.name: numpy_helper.to_array(i).tolist() for i in pruned.graph.initializer if i.name.endswith("/shape")}
    assert split["layer0/attention/output/MatMul/heads/query/shape"] == [0, 0, 3, 16]  # the shared constant, per block
    assert split["layer0/attention/output/MatMul/heads/context/shape"] == [0, 0, 48]
    for want, got in zip(run_model(model, INPUTS), run_model(pruned, INPUTS)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_a_model_cut_before_is_read_with_each_blocks_own_head_count():
    """After a head cut in block 0 only, the blocks keep 3 and 4 heads of size 16: a second cut reads each block's
    own count (not the model's 4 everywhere, which would split block 0's 48 features into heads of 12) and is
    exact on heads that contribute nothing."""
    model = _silence_head(_silence_head(models.transformer(layers=2), 0, 3), 1, 1)
    once, kept = _pruned(model, 3, only=0)
    blocks = find_attention_blocks(find_linear_layers(gs.import_onnx(once)), heads=4)
    assert kept == [[0, 1, 2]] and [(b.heads, b.head_dim) for b in blocks] == [(3, 16), (4, 16)]
    twice, kept = _pruned(once, 3, only=1)
    assert kept == [[0, 2, 3]]
    split = {i.name: numpy_helper.to_array(i).tolist() for i in twice.graph.initializer if i.name.endswith("/shape")}
    assert split["layer1/attention/output/MatMul/heads/query/shape"] == [0, 0, 3, 16]
    for want, got in zip(run_model(model, INPUTS), run_model(twice, INPUTS)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_fewer_heads_cost_accuracy_gradually():
    model = models.transformer(layers=2)
    reference = run_model(model, INPUTS)[1]
    cosines = []
    for keep in (4, 3, 2):
        output = run_model(_pruned(model, keep)[0], INPUTS)[1]
        cosines.append(float(np.mean((reference * output).sum(1) / np.linalg.norm(reference, axis=1)
                                     / np.linalg.norm(output, axis=1))))
    assert cosines[0] == pytest.approx(1.0, abs=1e-6) and cosines[0] > cosines[1] > cosines[2] > 0.5


def test_build_removes_heads_and_splits_the_rest(transformer_files, tmp_path):
    model, calib = transformer_files
    out = tmp_path / "out"
    report, narrowed = built_cut(model, calib, out, "--heads-keep", "0.5", "--ffn-keep", "0.5", "--rank-budget", "1")
    assert len(narrowed) == 12  # Q, K, V, O and the FFN pair of both layers
    query = narrowed["layer0/attention/query/MatMul"]
    assert query["reason"] == "2 of 4 heads kept (--heads-keep)" and query["params_after"] == 64 * 32
    assert narrowed["layer0/attention/output/MatMul"]["params_after"] == 32 * 64
    assert report["config"]["heads_keep"] == 0.5
    assert report["params"]["linear_ratio"] == pytest.approx(0.5)
    meta = {p.key: p.value for p in onnx.load(str(out / "tiny.lowrank.onnx")).metadata_props}
    assert meta["lrdeploy.heads_keep"] == "0.5" and meta["lrdeploy.ffn_keep"] == "0.5"
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.5
