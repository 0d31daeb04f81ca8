"""Calibration and evaluation data from a folder of images or audio files, as the model reads them: made by the
model's own preprocessor (transformers' AutoImageProcessor: resize, crop, rescale, normalise → `pixel_values`;
AutoFeatureExtractor: log-mel frames → `input_features` for Whisper, or raw samples → `input_values`).

    folder of files ─seeded shuffle─► held-out │ calibration files ─preprocessor─► eval.npz │ calib.npz

Files, not crops, are split, so no held-out file is calibrated on. Audio is read with Python's `wave` (PCM WAV),
mixed to mono and resampled by linear interpolation to the extractor's sampling rate: no audio library needed."""

from __future__ import annotations

import wave
from pathlib import Path
from typing import Callable

import numpy as np

from lrdeploy.errors import CalibrationDataError, MissingDependencyError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
AUDIO_SUFFIXES = (".wav",)
Arrays = dict[str, np.ndarray]


def media_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files under `folder` (recursively) with one of `suffixes`, in a fixed order."""
    return sorted(path for path in Path(folder).rglob("*") if path.suffix.lower() in suffixes)


def image_files(folder: Path) -> list[Path]:
    return media_files(folder, IMAGE_SUFFIXES)


def audio_files(folder: Path) -> list[Path]:
    return media_files(folder, AUDIO_SUFFIXES)


def _split(files: list[Path], folder: Path, what: str, suffixes: tuple[str, ...], calib_count: int, eval_count: int,
           seed: int, prepare: Callable[[list[Path]], Arrays]) -> tuple[Arrays, Arrays]:
    """(calibration, evaluation) arrays from disjoint files, the evaluation side first from a seeded shuffle."""
    if len(files) < calib_count + eval_count:
        raise CalibrationDataError(f"{calib_count} calibration + {eval_count} evaluation {what} were asked for, but "
                                   f"{folder} holds {len(files)} {what} ({', '.join(suffixes)}); give more or fewer "
                                   "(--calib-count, --eval-count)")
    order = np.random.default_rng(seed).permutation(len(files))
    chosen = [files[i] for i in order[:eval_count + calib_count]]
    return prepare(chosen[eval_count:]), prepare(chosen[:eval_count])


def _preprocessor(auto_class: str, processor_dir: Path, what: str):
    """The model's own preprocessor, loaded by transformers' `auto_class` from the model's folder."""
    try:
        import transformers
    except ImportError:
        raise MissingDependencyError(f"a {what} needs transformers; install lrdeploy's torch extra") from None
    try:
        return getattr(transformers, auto_class).from_pretrained(str(processor_dir))
    except (OSError, ValueError) as exc:
        raise CalibrationDataError(f"{processor_dir} has no {what} ({type(exc).__name__}); pass the model's Hugging "
                                   "Face folder (its preprocessor_config.json)") from None


def image_splits(folder: Path, processor_dir: Path, calib_count: int, eval_count: int,
                 seed: int = 0) -> tuple[Arrays, Arrays]:
    """(calibration, evaluation) inputs: `pixel_values` [images, channels, height, width] float32."""
    try:
        from PIL import Image
    except ImportError:
        raise MissingDependencyError("images need Pillow; install lrdeploy's torch extra") from None
    processor = _preprocessor("AutoImageProcessor", processor_dir, "image processor")

    def pixels(paths: list[Path]) -> Arrays:
        images = []
        for path in paths:
            try:
                with Image.open(path) as image:
                    images.append(image.convert("RGB"))
            except OSError as exc:
                raise CalibrationDataError(f"cannot read image {path} ({exc}); remove it or convert it") from None
        values = processor(images=images, return_tensors="np")["pixel_values"]
        return {"pixel_values": np.asarray(values, np.float32)}

    return _split(image_files(folder), folder, "images", IMAGE_SUFFIXES, calib_count, eval_count, seed, pixels)


def read_wav(path: Path, rate: int) -> np.ndarray:
    """The PCM WAV file at `path` as mono float32 samples in [-1, 1] at `rate` Hz."""
    try:
        with wave.open(str(path), "rb") as audio:
            width, channels, source_rate = audio.getsampwidth(), audio.getnchannels(), audio.getframerate()
            frames = audio.readframes(audio.getnframes())
    except (wave.Error, EOFError, OSError) as exc:
        raise CalibrationDataError(f"cannot read audio {path} ({exc}); give PCM WAV files") from None
    if width not in (1, 2, 4):
        raise CalibrationDataError(f"{path} has {8 * width}-bit samples; give 8-, 16- or 32-bit PCM WAV files")
    samples = np.frombuffer(frames, {1: np.uint8, 2: np.int16, 4: np.int32}[width]).astype(np.float32)
    samples = (samples - 128) / 128 if width == 1 else samples / float(2 ** (8 * width - 1))
    mono = samples.reshape(-1, channels).mean(axis=1)
    if source_rate == rate or mono.size == 0:
        return mono
    times = np.arange(int(round(mono.size * rate / source_rate))) / rate
    return np.interp(times, np.arange(mono.size) / source_rate, mono).astype(np.float32)


def audio_splits(folder: Path, processor_dir: Path, calib_count: int, eval_count: int,
                 seed: int = 0) -> tuple[Arrays, Arrays]:
    """(calibration, evaluation) inputs made by the model's feature extractor (Whisper: `input_features` [clips,
    mel bins, frames], padded or cut to its window)."""
    extractor = _preprocessor("AutoFeatureExtractor", processor_dir, "feature extractor")
    name, rate = extractor.model_input_names[0], int(extractor.sampling_rate)

    def features(paths: list[Path]) -> Arrays:
        values = extractor([read_wav(path, rate) for path in paths], sampling_rate=rate, return_tensors="np")[name]
        return {name: np.asarray(values, np.float32)}

    return _split(audio_files(folder), folder, "audio files", AUDIO_SUFFIXES, calib_count, eval_count, seed, features)
