"""Calibration and evaluation data from a folder of images, as an image model reads them: `pixel_values` made
by the model's own image processor (transformers' AutoImageProcessor: resize, crop, rescale, normalise).

    folder of images ─seeded shuffle─► held-out │ calibration images ─processor─► eval.npz │ calib.npz

Files, not crops, are split, so no held-out image is calibrated on."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lrdeploy.errors import CalibrationDataError, MissingDependencyError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def image_files(folder: Path) -> list[Path]:
    """The image files under `folder` (recursively), in a fixed order."""
    return sorted(path for path in Path(folder).rglob("*") if path.suffix.lower() in IMAGE_SUFFIXES)


def image_splits(folder: Path, processor_dir: Path, calib_count: int, eval_count: int,
                 seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(calibration, evaluation) inputs: `pixel_values` [images, channels, height, width] float32 from disjoint
    images (the evaluation side first, from a seeded shuffle of the files)."""
    try:
        from PIL import Image
        from transformers import AutoImageProcessor
    except ImportError:
        raise MissingDependencyError("images need transformers and Pillow; install lrdeploy's torch extra") from None
    files = image_files(folder)
    if len(files) < calib_count + eval_count:
        raise CalibrationDataError(f"{calib_count} calibration + {eval_count} evaluation images were asked for, but "
                                   f"{folder} holds {len(files)} image files ({', '.join(IMAGE_SUFFIXES)}); give more "
                                   "images or fewer (--calib-count, --eval-count)")
    order = np.random.default_rng(seed).permutation(len(files))
    chosen = [files[i] for i in order[:eval_count + calib_count]]
    try:
        processor = AutoImageProcessor.from_pretrained(str(processor_dir))
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"{processor_dir} has no image processor ({type(exc).__name__}); pass the model's "
                                   "Hugging Face folder (its preprocessor_config.json)") from None

    def pixels(paths: list[Path]) -> dict[str, np.ndarray]:
        images = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except OSError as exc:
                raise CalibrationDataError(f"cannot read image {path} ({exc}); remove it or convert it") from None
        values = processor(images=images, return_tensors="np")["pixel_values"]
        return {"pixel_values": np.asarray(values, np.float32)}

    return pixels(chosen[eval_count:]), pixels(chosen[:eval_count])
