"""Images as an image model reads them: `lrdeploy data --images` runs the model's own image processor, keeps the
held-out images apart, and an image classifier exported by `export --task image-classification` builds on them
with its label agreement reported (images made in code: no pretrained vision model can be downloaded here)."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")
PIL = pytest.importorskip("PIL.Image")

from lrdeploy.cli import main  # noqa: E402
from tests.factories import tiny_vit_classifier_dir  # noqa: E402


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    folder = tmp_path_factory.mktemp("vit")
    images = folder / "images"
    (images / "more").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for index in range(40):  # gradients and noise of a few sizes, some in a subfolder, PNG and JPEG
        size = (40 + index % 3 * 8, 36 + index % 2 * 12)
        x = np.linspace(0, 255, size[0])[None, :, None] * rng.random(3)[None, None, :]
        pixels = np.clip(x + rng.normal(0, 30, (size[1], size[0], 3)), 0, 255).astype(np.uint8)
        target = images / ("more" if index % 4 == 0 else "") / f"img{index}.{'jpg' if index % 2 else 'png'}"
        PIL.fromarray(pixels).save(target)
    (images / "notes.txt").write_text("not an image")
    return tiny_vit_classifier_dir(folder / "hf"), images


def test_data_makes_pixel_values_with_the_models_processor_and_keeps_held_out_images_apart(vit, tmp_path):
    from transformers import AutoImageProcessor

    from lrdeploy.calib.media import image_files

    folder, images = vit
    result = CliRunner().invoke(main, ["data", "--images", str(images), "--processor", str(folder), "--calib-count", "24",
                                       "--eval-count", "12", "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "24 calibration and 12 held-out images (3 × 32 × 32 pixel_values)" in result.output
    calib = np.load(tmp_path / "d" / "calib.npz", allow_pickle=False)["pixel_values"]
    held_out = np.load(tmp_path / "d" / "eval.npz", allow_pickle=False)["pixel_values"]
    assert calib.shape == (24, 3, 32, 32) and held_out.shape == (12, 3, 32, 32) and calib.dtype == np.float32
    processor = AutoImageProcessor.from_pretrained(str(folder))
    every = {PIL.open(path).convert("RGB").tobytes(): path for path in image_files(images)}
    assert len(image_files(images)) == 40
    expected = processor(images=[PIL.open(path).convert("RGB") for path in every.values()],
                         return_tensors="np")["pixel_values"]
    rows = {row.tobytes() for row in expected}
    assert all(row.tobytes() in rows for row in calib) and all(row.tobytes() in rows for row in held_out)
    assert not {row.tobytes() for row in calib} & {row.tobytes() for row in held_out}
    refused = CliRunner().invoke(main, ["data", "--images", str(images), "--processor", str(folder),
                                        "--calib-count", "40", "--eval-count", "12", "-o", str(tmp_path / "e")])
    assert refused.exit_code == 1 and not (tmp_path / "e").exists()
    assert "40 calibration + 12 evaluation images were asked for, but" in refused.stderr


def test_an_image_classifier_exports_builds_and_reports_label_agreement(vit, tmp_path):
    from tests.conftest import run_model

    folder, images = vit
    export = CliRunner().invoke(main, ["export", "--hf", str(folder), "--task", "image-classification",
                                       "-o", str(tmp_path / "vit.onnx")])
    assert export.exit_code == 0, export.output
    assert "inputs pixel_values; outputs logits" in export.output
    CliRunner().invoke(main, ["data", "--images", str(images), "--processor", str(folder), "--calib-count", "28",
                              "--eval-count", "12", "-o", str(tmp_path / "d")])
    args = ["build", str(tmp_path / "vit.onnx"), "--calib", str(tmp_path / "d" / "calib.npz"),
            "--eval", str(tmp_path / "d" / "eval.npz")]
    full = CliRunner().invoke(main, [*args, "--rank-budget", "1", "-o", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    figures = json.loads((tmp_path / "full" / "report.json").read_text())["accuracy"]["outputs"]["logits"]["classes"]
    assert figures == {"samples": 12, "top1_agreement": 1.0, "kl": pytest.approx(0.0, abs=1e-9)}
    half = CliRunner().invoke(main, [*args, "--rank-budget", "0.5", "-o", str(tmp_path / "half")])
    assert half.exit_code == 0, half.output
    report = json.loads((tmp_path / "half" / "report.json").read_text())
    assert report["params"]["linear_ratio"] <= 0.5
    assert "Classifier figures of 'logits' on 12 held-out samples" in " ".join(half.output.split())
    feed = {"pixel_values": np.load(tmp_path / "d" / "eval.npz")["pixel_values"][:3]}
    (logits,) = run_model(tmp_path / "half" / "vit.lowrank.onnx", feed)
    assert logits.shape == (3, 5)
