"""Audio as an audio model reads it: `lrdeploy data --audio` reads PCM WAV files (any rate, mono or stereo),
resamples them to the feature extractor's rate, runs the model's own feature extractor and keeps the held-out
clips apart; Whisper's encoder exported by `export --hf` builds on them (clips and model made in code: no
pretrained audio model can be downloaded here)."""

import json
import wave

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from lrdeploy.calib.media import read_wav  # noqa: E402
from lrdeploy.cli import main  # noqa: E402


def _write_wav(path, samples: np.ndarray, rate: int, channels: int = 1) -> None:
    with wave.open(str(path), "wb") as audio:
        audio.setnchannels(channels)
        audio.setsampwidth(2)
        audio.setframerate(rate)
        audio.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())


@pytest.fixture(scope="module")
def whisper(tmp_path_factory):
    """A 2-block Whisper (16 mel bins, 1-second windows: 100 frames) with its feature extractor, and 30 clips of
    tones and noise, some at 8 kHz in stereo."""
    import torch

    folder = tmp_path_factory.mktemp("whisper")
    torch.manual_seed(0)
    transformers.WhisperModel(transformers.WhisperConfig(
        num_mel_bins=16, max_source_positions=50, d_model=64, encoder_layers=2, decoder_layers=1,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
        vocab_size=64, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        init_std=0.2)).save_pretrained(str(folder / "hf"))
    transformers.WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(str(folder / "hf"))
    clips = folder / "clips"
    clips.mkdir()
    rng = np.random.default_rng(0)
    for index in range(30):
        rate, channels = (8000, 2) if index % 3 == 0 else (16000, 1)
        t = np.arange(int(rate * (0.4 + 0.02 * index))) / rate
        tone = 0.3 * np.sin(2 * np.pi * (200 + 40 * index) * t) + 0.05 * rng.standard_normal(t.size)
        _write_wav(clips / f"clip{index}.wav", np.repeat(tone, channels), rate, channels)
    (clips / "notes.txt").write_text("not audio")
    return folder


def test_read_wav_mixes_to_mono_and_resamples(tmp_path):
    t = np.arange(800) / 8000
    stereo = np.stack([np.sin(2 * np.pi * 100 * t), np.sin(2 * np.pi * 100 * t)], axis=1).reshape(-1)
    _write_wav(tmp_path / "a.wav", 0.5 * stereo, 8000, 2)
    samples = read_wav(tmp_path / "a.wav", 16000)
    assert samples.dtype == np.float32 and samples.size == 1600
    want = 0.5 * np.sin(2 * np.pi * 100 * np.arange(1600) / 16000)
    assert np.max(np.abs(samples[:-2] - want[:-2])) < 2e-3  # linear interpolation of a 100 Hz tone at 8 kHz


def test_data_makes_features_and_whisper_builds_on_them(whisper, tmp_path):
    result = CliRunner().invoke(main, ["data", "--audio", str(whisper / "clips"), "--processor", str(whisper / "hf"),
                                       "--calib-count", "20", "--eval-count", "8", "-o", str(tmp_path / "d")])
    assert result.exit_code == 0, result.output
    assert "20 calibration and 8 held-out audio clips (16 × 100 input_features)" in result.output
    calib, held_out = np.load(tmp_path / "d" / "calib.npz"), np.load(tmp_path / "d" / "eval.npz")
    assert calib["input_features"].shape == (20, 16, 100) and held_out["input_features"].shape == (8, 16, 100)
    rows = {row.tobytes() for row in calib["input_features"]}
    assert not rows & {row.tobytes() for row in held_out["input_features"]}  # no held-out clip calibrated on
    exported = CliRunner().invoke(main, ["export", "--hf", str(whisper / "hf"), "--pooling", "none",
                                         "-o", str(tmp_path / "whisper.onnx")])
    assert exported.exit_code == 0, exported.output
    built = CliRunner().invoke(main, ["build", str(tmp_path / "whisper.onnx"), "--calib", str(tmp_path / "d/calib.npz"),
                                      "--eval", str(tmp_path / "d/eval.npz"), "--rank-budget", "0.6", "--no-cache",
                                      "-o", str(tmp_path / "out"), "--json"])
    assert built.exit_code == 0, built.output
    report = json.loads(built.stdout)
    assert report["accuracy"]["samples"] == 8 and report["params"]["linear_ratio"] <= 0.6


def test_too_few_clips_is_one_error_line(whisper, tmp_path):
    result = CliRunner().invoke(main, ["data", "--audio", str(whisper / "clips"), "--processor", str(whisper / "hf"),
                                       "--calib-count", "40", "-o", str(tmp_path / "d")])
    assert result.exit_code == 1 and not (tmp_path / "d").exists()
    (line,) = result.stderr.strip().splitlines()
    assert line == (f"Error: 40 calibration + 128 evaluation audio files were asked for, but {whisper / 'clips'} holds "
                    "30 audio files (.wav); give more or fewer (--calib-count, --eval-count)")
