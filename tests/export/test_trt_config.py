"""TensorRT engine configuration, checked without TensorRT."""

import importlib.util

import onnx
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.errors import EngineConfigError, OptionError
from lrdeploy.export.trt import EngineConfig, create_config_loader, parse_profile_shapes, trtexec_command
from tests import models

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_profile_shapes_one_two_or_three():
    shapes = parse_profile_shapes(["input_ids:1x128,8x128,32x128", "mask:4x16", "x:1x8,2x8"])
    assert shapes == {
        "input_ids": ((1, 128), (8, 128), (32, 128)),
        "mask": ((4, 16), (4, 16), (4, 16)),
        "x": ((1, 8), (2, 8), (2, 8)),
    }


@pytest.mark.parametrize("item, error, message", [
    ("input_ids", OptionError, r"--shape 'input_ids' is not NAME:MIN\[,OPT\[,MAX\]\]; write it like input_ids:1x128,8x128,32x128"),
    ("input_ids:1xa", OptionError, r"--shape 'input_ids:1xa' is not NAME:MIN\[,OPT\[,MAX\]\]"),
    ("input_ids:8x128,1x128", EngineConfigError, r"shapes must grow from min to opt to max"),
    ("input_ids:1x128,8x128x2", EngineConfigError, r"give one to three shapes of the same rank"),
])
def test_bad_profile_shapes(item, error, message):
    with pytest.raises(error, match=message):
        parse_profile_shapes([item])


@pytest.mark.parametrize("precision, flags", [
    ("fp32", (False, False, False)), ("fp16", (True, True, False)), ("bf16", (True, False, True)),
    ("best", (True, True, True)),
])
def test_precision_flags_reach_polygraphy_config(tmp_path, precision, flags):
    config = EngineConfig(tmp_path / "m.onnx", tmp_path / "m.engine", precision,
                          parse_profile_shapes(["input_ids:1x128,8x128,32x128"]))
    loader = create_config_loader(config)
    assert (loader.tf32, loader.fp16, loader.bf16) == flags
    (profile,) = loader.profiles
    assert tuple(profile["input_ids"]) == ((1, 128), (8, 128), (32, 128))


def test_timing_cache_is_loaded_only_when_present(tmp_path):
    config = EngineConfig(tmp_path / "m.onnx", tmp_path / "m.engine", timing_cache=tmp_path / "cache.bin")
    assert create_config_loader(config).timing_cache_path is None
    (tmp_path / "cache.bin").write_bytes(b"x")
    assert create_config_loader(config).timing_cache_path == str(tmp_path / "cache.bin")


def test_unknown_precision():
    with pytest.raises(EngineConfigError, match="--precision 'int4' is not one of fp32, fp16, bf16, best"):
        EngineConfig("m.onnx", "m.engine", "int4")


def test_trtexec_command():
    config = EngineConfig("m.onnx", "m.engine", "fp16", parse_profile_shapes(
        ["input_ids:1x128,8x128,32x128", "attention_mask:1x128,8x128,32x128"]), "tc.bin", 2048)
    assert trtexec_command(config) == (
        "trtexec --onnx=m.onnx --saveEngine=m.engine --fp16 "
        "--minShapes=input_ids:1x128,attention_mask:1x128 --optShapes=input_ids:8x128,attention_mask:8x128 "
        "--maxShapes=input_ids:32x128,attention_mask:32x128 --timingCacheFile=tc.bin --memPoolSize=workspace:2048M"
    )
    assert "--noTF32" in trtexec_command(EngineConfig("m.onnx", "m.engine", "fp32"))


@pytest.mark.skipif(HAS_TRT, reason="TensorRT is installed")
@pytest.mark.parametrize("spelling", ["--shape", "--shapes"])  # --shapes: the old spelling, kept as a hidden alias
def test_engine_command_without_tensorrt_gives_one_error_line(tmp_path, spelling):
    onnx.save(models.matmul_add(), tmp_path / "m.onnx")
    result = CliRunner().invoke(main, ["engine", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "m.engine"),
                                       spelling, "x:1x64,8x64,32x64"])
    assert result.exit_code == 1
    assert "trtexec --onnx=" in result.stdout and "--minShapes=x:1x64 --optShapes=x:8x64 --maxShapes=x:32x64" in result.stdout
    assert result.stderr.strip() == ("Error: TensorRT is not installed; on a machine with an NVIDIA GPU run "
                                     "`pip install lrdeploy[gpu]` (tensorrt), or time the ONNX model on ONNX Runtime "
                                     "instead (`lrdeploy bench MODEL --backend ort-cuda`)")
    assert not (tmp_path / "m.engine").exists()


def test_engine_help_shows_one_shape_spelling():
    text = CliRunner().invoke(main, ["engine", "--help"]).output
    assert "--shape NAME:MIN[,OPT[,MAX]]" in text and "--shapes" not in text


@pytest.mark.tensorrt
@pytest.mark.skipif(not HAS_TRT, reason="needs TensorRT and an NVIDIA GPU")
def test_engine_builds_and_matches_onnxruntime(tmp_path):
    import numpy as np

    from lrdeploy.export.trt import build_engine
    from lrdeploy.runtime.tensorrt import TrtRunner
    from tests.conftest import run_model

    onnx.save(models.matmul_add(), tmp_path / "m.onnx")
    config = EngineConfig(tmp_path / "m.onnx", tmp_path / "m.engine", "fp32", parse_profile_shapes(["x:1x64,8x64,32x64"]))
    build_engine(config)
    x = np.ones((8, 64), np.float32)
    with TrtRunner(tmp_path / "m.engine") as runner:
        np.testing.assert_allclose(runner.infer({"x": x})["y"], run_model(tmp_path / "m.onnx", {"x": x})[0], rtol=1e-3)
