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
