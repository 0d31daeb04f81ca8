"""Vision transformers (pre-LayerNorm ViT, as torch's legacy exporter writes it): every structured cut is exact
where what it removes writes nothing — heads, FFN neurons, a whole block dropped on the residual stream (the
silent no-op this used to be) — and the unified plan builds; models and images made in code."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lrdeploy.cli import main  # noqa: E402
from tests.conftest import run_model  # noqa: E402


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    """A ViT classifier whose heads 2 and 3, odd FFN neurons and block 1 write nothing, exported, with pixel values."""
    from transformers import ViTForImageClassification

    from lrdeploy.export.torch_onnx import export_hf
    from tests.factories import tiny_vit_classifier_dir

    folder = tmp_path_factory.mktemp("vit")
    model = ViTForImageClassification.from_pretrained(str(tiny_vit_classifier_dir(folder / "hf")))
    with torch.no_grad():
        for index, layer in enumerate(model.vit.layers):  # transformers 5's ViT layout
            layer.attention.o_proj.weight[:, 32:] = 0  # nn.Linear [out, in]: context of heads 2, 3
            layer.mlp.fc2.weight[:, 1::2] = 0  # odd FFN neurons
            if index == 1:
                for dense in (layer.attention.o_proj, layer.mlp.fc2):
                    dense.weight.zero_()
                    dense.bias.zero_()
    model.save_pretrained(str(folder / "hf"))
    export_hf(folder / "hf", folder / "vit.onnx", task="image-classification")
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", pixel_values=rng.standard_normal((96, 3, 32, 32)).astype(np.float32))
    np.savez(folder / "eval.npz", pixel_values=rng.standard_normal((16, 3, 32, 32)).astype(np.float32))
    return folder


@pytest.mark.parametrize("cut, status, count", [
    (["--heads-keep", "0.5"], "narrowed", 8),
    (["--ffn-keep", "0.5"], "narrowed", 4),
    (["--drop-blocks", "1"], "dropped", 6),
])
def test_vit_cuts_are_exact_where_what_they_remove_writes_nothing(vit, tmp_path, cut, status, count):
    result = CliRunner().invoke(main, ["build", str(vit / "vit.onnx"), "--calib", str(vit / "calib.npz"),
                                       "--eval", str(vit / "eval.npz"), "--rank-budget", "1", *cut,
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert [layer["status"] for layer in report["layers"]].count(status) == count
    feed = {"pixel_values": np.load(vit / "eval.npz")["pixel_values"]}
    (dense,) = run_model(vit / "vit.onnx", feed)
    (compressed,) = run_model(tmp_path / "out" / "vit.lowrank.onnx", feed)
    np.testing.assert_allclose(compressed, dense, atol=2e-4 * np.abs(dense).max())
    assert report["accuracy"]["outputs"]["logits"]["classes"]["top1_agreement"] == 1.0
    if status == "dropped":
        import onnx

        built = onnx.load(str(tmp_path / "out" / "vit.lowrank.onnx"))
        assert sum(n.op_type == "MatMul" for n in built.graph.node) == sum(
            n.op_type == "MatMul" for n in onnx.load(str(vit / "vit.onnx")).graph.node) - 8


def test_the_unified_plan_builds_a_vit_and_takes_the_free_drop(vit, tmp_path):
    result = CliRunner().invoke(main, ["build", str(vit / "vit.onnx"), "--calib", str(vit / "calib.npz"),
                                       "--eval", str(vit / "eval.npz"), "--rank-budget", "0.5", "--json",
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["latency_plan"]["plan"] == "unified" and report["params"]["linear_ratio"] <= 0.5
    assert "block1 drop" in report["latency_plan"]["choices"]
