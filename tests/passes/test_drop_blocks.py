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


def test_pre_layernorm_blocks_are_refused_with_the_reason_not_faked(tmp_path):
    """A pre-LN block's residual stream runs past the tensor the next block reads: making that tensor the identity
    would leave the block computed and change the outputs (the silent no-op of ViT, DeiT and Whisper drops)."""
    from lrdeploy.passes.drop_blocks import match_transformer_blocks

    model = models.transformer(layers=3, pre_ln=True)
    graph = gs.import_onnx(model)
    layers = find_linear_layers(graph)
    matches = match_transformer_blocks(graph, find_attention_blocks(layers, 4), find_ffn_blocks(graph, layers))
    assert matches.found == [] and len(matches.refused) == 3
    assert all("a pre-LayerNorm block" in refusal.reason for refusal in matches.refused)
    onnx.save(model, tmp_path / "pre.onnx")
    np.savez(tmp_path / "calib.npz", **INPUTS)
    result = CliRunner().invoke(main, ["build", str(tmp_path / "pre.onnx"), "--calib", str(tmp_path / "calib.npz"),
                                       "--drop-blocks", "1", "-o", str(tmp_path / "o")])
    assert result.exit_code == 1 and not (tmp_path / "o").exists()
    assert result.stderr.startswith("Error: ") and "has no block to drop (block0: " in result.stderr, result.stderr
    assert "a pre-LayerNorm block" in result.stderr


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
