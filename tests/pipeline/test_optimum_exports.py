"""Graphs as Hugging Face Optimum (transformers 4) writes them (tests/data/optimum/): CLIP's attention reads the
context width from the hidden states' shape at run time, Swin reshapes its shifted windows' scores to 5-D, T5
slices its relative position bias; CLIP's dual export has a vision tower beside the masked text tower; the BERT
classifier fuses to ONNX Runtime's Attention. Head cuts are exact where the removed heads write nothing."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from tests.conftest import run_model
from tests.optimum_graphs import graph_inputs, optimum_graph


def _build(tmp_path, model, *options):
    np.savez(tmp_path / "calib.npz", **graph_inputs(model, 64, 0))
    np.savez(tmp_path / "eval.npz", **graph_inputs(model, 16, 1))
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(tmp_path / "calib.npz"), "--eval",
                                       str(tmp_path / "eval.npz"), "--no-cache", "-o", str(tmp_path / "out"),
                                       "--json", *options])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout), tmp_path / "out" / model.name.replace(".onnx", ".lowrank.onnx")


@pytest.mark.parametrize("name, cut, narrowed", [
    ("clip_vision.onnx", "--heads-keep", 8), ("swin.onnx", "--heads-keep", 16), ("t5_encoder.onnx", "--heads-keep", 8),
    ("llama.onnx", "--heads-keep", 8), ("llama.onnx", "--ffn-keep", 6), ("gpt2.onnx", "--heads-keep", 4),
    ("gpt2.onnx", "--ffn-keep", 4)])
def test_silent_heads_and_neurons_are_removed_exactly(tmp_path, name, cut, narrowed):
    """Q, K, V and O of each block (GPT-2: its fused c_attn and O), or gate, up and down (GPT-2: up and down);
    Llama's heads are cut as whole key/value groups."""
    model = optimum_graph(name, tmp_path / name, silence_half_heads=cut == "--heads-keep",
                          silence_half_neurons=cut == "--ffn-keep")
    report, written = _build(tmp_path, model, cut, "0.5", "--rank-budget", "1")
    assert sum(layer["status"] == "narrowed" for layer in report["layers"]) == narrowed
    feeds = graph_inputs(model, 8, 2)
    for want, got in zip(run_model(model, feeds), run_model(written, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * max(1.0, float(np.abs(want).max())))  # refit


def test_clip_towers_calibrate_apart_and_drop_within_their_tower(tmp_path):
    """Only the text tower's positions are masked; a dropped block ends at its own tower's residual join."""
    model = optimum_graph("clip.onnx", tmp_path / "clip.onnx")
    report, written = _build(tmp_path, model, "--drop-blocks", "1", "--rank-budget", "0.6", "--plan", "lowrank")
    dropped = [layer["name"] for layer in report["layers"] if layer["status"] == "dropped"]
    assert len(dropped) == 6 and len({name.split("/encoder/")[0] for name in dropped}) == 1  # one tower's block
    assert sum(layer["status"] == "factorized" for layer in report["layers"]) > 0
    outputs = report["accuracy"]["outputs"]
    assert set(outputs) >= {"text_embeds", "image_embeds"} and all(o["cosine_mean"] > 0.5 for o in outputs.values())
    assert run_model(written, graph_inputs(model, 2, 3))[0].shape == (2, 2)  # logits_per_image: images × texts


def test_bert_classifier_keeps_onnx_runtimes_attention(tmp_path):
    model = optimum_graph("bert_classifier.onnx", tmp_path / "bert_classifier.onnx")
    report, _ = _build(tmp_path, model, "--optimize", "ort", "--rank-budget", "0.5")
    fused = report["fused_ops"]
    assert fused["dense"]["Attention"] == 2 and fused["compressed"]["Attention"] == 2
    classes = report["accuracy"]["outputs"]["logits"]["classes"]
    assert classes["samples"] == 16 and 0.0 <= classes["top1_agreement"] <= 1.0
