"""Swin (window attention, shifted windows, patch merging), exported by torch's legacy and dynamo exporters:
a head cut also narrows what states the head axis inside the attention — the [windows, H, N, N] reshapes of the
shifted windows' mask and the relative position bias added to the scores — and is exact where the heads it
removes write nothing (their rows of every W_o zeroed in PyTorch before export)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

from lrdeploy.cli import main  # noqa: E402
from tests.conftest import run_model  # noqa: E402


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


def _swin_with_silent_heads():
    """A 2-stage Swin (2 and 4 heads of 16, windows of 4×4 patches, the second block of each stage shifted) whose
    odd heads write nothing, and whose third block (the second stage's first) adds nothing to its stream."""
    from transformers import SwinConfig, SwinForImageClassification

    torch.manual_seed(0)
    model = SwinForImageClassification(SwinConfig(
        image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=5,
        initializer_range=0.2, attn_implementation="eager")).eval()
    with torch.no_grad():
        for stage in model.swin.encoder.layers:
            for block in stage.blocks:
                output = block.attention.output.dense if hasattr(block.attention, "output") else block.attention.o_proj
                for head in range(1, output.in_features // 16, 2):
                    output.weight[:, head * 16:(head + 1) * 16] = 0
        silent = model.swin.encoder.layers[1].blocks[0]
        for linear in (silent.attention.o_proj, silent.mlp.fc2):
            linear.weight.zero_()
            linear.bias.zero_()
    return Logits(model).eval()


@pytest.fixture(scope="module", params=["legacy", "dynamo"])
def swin(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"swin-{request.param}")
    module, path = _swin_with_silent_heads(), folder / "swin.onnx"
    example = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        if request.param == "legacy":
            torch.onnx.export(module, (example,), str(path), dynamo=False, opset_version=17,
                              input_names=["pixel_values"], output_names=["logits"],
                              dynamic_axes={"pixel_values": {0: "batch"}, "logits": {0: "batch"}})
        else:
            torch.onnx.export(module, (example,), dynamo=True, input_names=["pixel_values"], output_names=["logits"],
                              dynamic_shapes=({0: torch.export.Dim("batch")},)).save(str(path))
    rng = np.random.default_rng(0)
    np.savez(folder / "calib.npz", pixel_values=rng.standard_normal((64, 3, 32, 32)).astype(np.float32))
    np.savez(folder / "eval.npz", pixel_values=rng.standard_normal((8, 3, 32, 32)).astype(np.float32))
    return folder


def _build(swin, out, *cut):
    result = CliRunner().invoke(main, ["build", str(swin / "swin.onnx"), "--calib", str(swin / "calib.npz"),
                                       "--eval", str(swin / "eval.npz"), *cut, "--rank-budget", "1", "--no-cache",
                                       "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def _assert_same_logits(swin, out):
    feeds = {"pixel_values": np.load(swin / "eval.npz")["pixel_values"]}
    want = run_model(swin / "swin.onnx", feeds)[0]
    got = run_model(out / "swin.lowrank.onnx", feeds)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_silent_window_heads_are_removed_exactly(swin):
    out = swin / "heads"
    report = _build(swin, out, "--heads-keep", "0.5")
    reasons = sorted({layer["reason"] for layer in report["layers"] if layer["status"] == "narrowed"})
    assert reasons == ["1 of 2 heads kept (--heads-keep)", "2 of 4 heads kept (--heads-keep)"]
    _assert_same_logits(swin, out)


def test_a_silent_window_block_is_dropped_exactly_and_patch_merging_never(swin):
    """The residual stream is found through the window partition; the first stage's last block spans the patch
    merging (its stream ends after it) and is refused; the silent block is the one dropped."""
    out = swin / "drop"
    report = _build(swin, out, "--drop-blocks", "1")
    dropped = {layer["reason"].split()[0] for layer in report["layers"] if layer["status"] == "dropped"}
    assert dropped == {"block2"}
    assert not any("downsample" in layer["name"] for layer in report["layers"] if layer["status"] == "dropped")
    _assert_same_logits(swin, out)
