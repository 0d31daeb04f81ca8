"""Dropping whole blocks: found from the attention blocks, exact when the block's residual branches add nothing,
and the least harmful block chosen by measurement."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.passes.drop_blocks import drop_block, find_transformer_blocks
from lrdeploy.passes.linear_layers import find_linear_layers
from lrdeploy.passes.prune_ffn import find_ffn_blocks
from lrdeploy.passes.prune_heads import find_attention_blocks
from tests import models
from tests.conftest import run_model

INPUTS = models.transformer_inputs(32)


def _blocks(graph):
    layers = find_linear_layers(graph)
    return find_transformer_blocks(graph, find_attention_blocks(layers, 4), find_ffn_blocks(graph, layers))


def test_blocks_follow_the_residual_stream():
    blocks = _blocks(gs.import_onnx(models.transformer(layers=3)))
    assert [(b.input_name, b.output_name) for b in blocks] == [
        ("embeddings/LayerNorm", "layer0/output/LayerNorm"), ("layer0/output/LayerNorm", "layer1/output/LayerNorm"),
        ("layer1/output/LayerNorm", "layer2/output/LayerNorm")]


def test_a_block_that_adds_nothing_is_dropped_exactly():
    model = models.silence_block(models.transformer(layers=3), 1)
    graph = gs.import_onnx(model)
    drop_block(graph, _blocks(graph)[1])
    dropped = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(dropped)
    assert not any(n.name.startswith("layer1/") for n in dropped.graph.node)
    for want, got in zip(run_model(model, INPUTS), run_model(dropped, INPUTS)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_build_drops_the_least_harmful_block(tmp_path):
    model = tmp_path / "t.onnx"
    onnx.save(models.silence_block(models.transformer(layers=3), 2), model)
    np.savez(tmp_path / "c.npz", **models.transformer_inputs(96))
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(tmp_path / "c.npz"), "--drop-blocks", "1",
                                       "--rank-budget", "0.5", "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    dropped = [l for l in report["layers"] if l["status"] == "dropped"]
    assert [l["name"] for l in dropped] == [f"layer2/{p}/MatMul" for p in (
        "attention/query", "attention/key", "attention/value", "attention/output", "intermediate", "output")]
    assert all(l["params_after"] == 0 and l["reason"].startswith("block2 dropped") for l in dropped)
    assert report["config"]["drop_blocks"] == 1 and "depth" in report["timings"]
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.8


def test_pre_layernorm_blocks_run_from_stream_to_stream():
    """A pre-LN block (ViT, GPT, Llama, Whisper) starts at the residual stream its norm reads, not at the normalised
    copy its projections read; the last one ends at its FFN's residual Add, before the final norm."""
    blocks = _blocks(gs.import_onnx(models.transformer(layers=3, pre_ln=True)))
    assert [(b.input_name, b.output_name) for b in blocks] == [
        ("embeddings/LayerNorm", "layer0/output/residual"), ("layer0/output/residual", "layer1/output/residual"),
        ("layer1/output/residual", "layer2/output/residual")]


def test_a_pre_layernorm_block_that_adds_nothing_is_dropped_exactly():
    """Dropped on the residual stream, a silent pre-LN block leaves the outputs as they were, and its MatMuls are
    gone (the silent no-op of ViT, DeiT and Whisper drops: the identity placed on the normalised copy left the
    block computed and changed the outputs)."""
    model = models.silence_block(models.transformer(layers=3, pre_ln=True), 1)
    graph = gs.import_onnx(model)
    result = drop_block(graph, _blocks(graph)[1])
    dropped = gs.export_onnx(graph.cleanup().toposort())
    assert result.counts["blocks_dropped"] == 1
    assert not any(n.name.startswith("layer1/") for n in dropped.graph.node)
    assert sum(n.op_type == "MatMul" for n in dropped.graph.node) == sum(
        n.op_type == "MatMul" for n in model.graph.node) - 8  # 6 projections, scores and context
    for want, got in zip(run_model(model, INPUTS), run_model(dropped, INPUTS)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_build_drops_a_pre_layernorm_block_for_real(tmp_path):
    model = tmp_path / "pre.onnx"
    onnx.save(models.silence_block(models.transformer(layers=3, pre_ln=True), 0), model)
    np.savez(tmp_path / "c.npz", **models.transformer_inputs(96))
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(tmp_path / "c.npz"), "--drop-blocks", "1",
                                       "--rank-budget", "1", "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert {l["name"] for l in report["layers"] if l["status"] == "dropped"} == {
        f"layer0/{p}/MatMul" for p in ("attention/query", "attention/key", "attention/value", "attention/output",
                                       "intermediate", "output")}
    written = onnx.load(str(tmp_path / "o" / "pre.lowrank.onnx"))
    assert not any(n.name.startswith("layer0/") for n in written.graph.node)
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.9999


def test_a_drop_that_leaves_the_block_computed_is_an_internal_error():
    """The pass checks what it did: forced onto a pre-LN block (which matching refuses), the identity leaves the
    block's MatMuls in the graph, and that is an InternalError, never a "dropped" in the report."""
    import pytest

    from lrdeploy.errors import InternalError
    from lrdeploy.passes.drop_blocks import TransformerBlock

    graph = gs.import_onnx(models.transformer(layers=3, pre_ln=True))
    forced = TransformerBlock("block0", "layer0/attention/LayerNorm", "layer1/attention/LayerNorm",
                              ("layer0/attention/query/MatMul", "layer0/output/MatMul"))
    with pytest.raises(InternalError, match=r"dropping block0 left 2 of its products in the graph"):
        drop_block(graph, forced)
    post = models.silence_block(models.transformer(layers=3), 1)
    graph = gs.import_onnx(post)
    result = drop_block(graph, _blocks(graph)[1])
    assert result.changed and result.counts["blocks_dropped"] == 1 and result.counts["nodes_removed"] > 20
