"""A classifier's figures (top-1 agreement, KL of the class distributions) against direct computations, and a
fine-tuned classifier's build reporting them first."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.stages.classes import ClassScores, is_class_logits


def test_top1_agreement_and_kl_match_their_definitions():
    rng = np.random.default_rng(0)
    dense, compressed = rng.standard_normal((6, 4)), rng.standard_normal((6, 4))
    scores = ClassScores()
    scores.add(dense[:4], compressed[:4])
    scores.add(dense[4:], compressed[4:])
    p = np.exp(dense) / np.exp(dense).sum(1, keepdims=True)
    q = np.exp(compressed) / np.exp(compressed).sum(1, keepdims=True)
    result = scores.result()
    assert result.samples == 6
    assert result.top1_agreement == pytest.approx(np.mean(dense.argmax(1) == compressed.argmax(1)))
    assert result.kl == pytest.approx(np.mean((p * np.log(p / q)).sum(1)), rel=1e-9)
    same = ClassScores()
    same.add(dense, dense)
    assert same.result().kl == pytest.approx(0.0, abs=1e-12) and same.result().top1_agreement == 1.0


def test_only_logits_of_two_or_more_classes_per_sample_are_a_classifier():
    assert is_class_logits("logits", np.zeros((3, 2)))
    assert not is_class_logits("embedding", np.zeros((3, 384)))  # a sentence embedding: neighbours, not labels
    assert not is_class_logits("logits", np.zeros((3, 1)))  # a regression score
    assert not is_class_logits("logits", np.zeros((3, 16, 100)))  # a language model's (next-token figures)


def test_a_sequence_classifier_build_leads_with_its_label_agreement(tmp_path):
    pytest.importorskip("transformers")
    from lrdeploy.export.torch_onnx import export_hf
    from tests.factories import tiny_classifier_dir

    export_hf(tiny_classifier_dir(tmp_path / "hf"), tmp_path / "cls.onnx", task="text-classification")
    rng = np.random.default_rng(0)
    ids = rng.integers(1, 300, (64, 16))
    np.savez(tmp_path / "calib.npz", input_ids=ids, attention_mask=np.ones_like(ids))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "cls.onnx"), "--calib", str(tmp_path / "calib.npz"),
                                       "--rank-budget", "0.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    figures = report["accuracy"]["outputs"]["logits"]["classes"]
    assert figures["samples"] > 0 and 0 <= figures["top1_agreement"] <= 1 and figures["kl"] >= 0
    assert report["accuracy"]["outputs"]["logits"]["topk_agreement"] is None  # labels, not neighbours
    assert "Classifier figures of 'logits'" in " ".join(result.output.split())
    assert "## Classifier figures of 'logits'" in (tmp_path / "out" / "report.md").read_text()
    assert "top-1 class agreement" in (tmp_path / "out" / "report.html").read_text()
