"""The memory estimate made before calibration: what the statistics hold, and one Error line when it cannot fit."""

import numpy as np
from click.testing import CliRunner

from lrdeploy.calib.stats import TensorRequest
from lrdeploy.cli import main
from lrdeploy.stages import memory
from lrdeploy.stages.memory import statistics_bytes
from tests import models


def test_statistics_bytes_counts_each_input_once_and_layers_by_their_narrower_side():
    from types import SimpleNamespace

    up = SimpleNamespace(name="up", d_in=64, d_out=256)  # wider out than in: solved on its input side
    down = SimpleNamespace(name="down", d_in=256, d_out=64)
    head = SimpleNamespace(name="head", d_in=64, d_out=49152)  # 49152² float64 would be 19 GB
    requests = [TensorRequest("x", 64), TensorRequest("x", 64), TensorRequest("h", 256)]
    needed, largest = statistics_bytes(requests, [up, down, head])
    assert needed == 8 * (64 * 64 + 256 * 256) + 16 * 3 * 64 * 64
    assert largest == "the input statistics of 'h' (256²)"


def test_a_build_that_cannot_fit_stops_before_calibrating(tmp_path, monkeypatch):
    import onnx

    path = tmp_path / "m.onnx"
    onnx.save(models.transformer(), str(path))
    np.savez(tmp_path / "calib.npz", **models.transformer_inputs(96))
    monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)  # 1 MiB left
    result = CliRunner().invoke(main, ["build", str(path), "--calib", str(tmp_path / "calib.npz"),
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 1 and "Traceback" not in result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("Error: the statistics of ") and "GiB available now; free memory or build on a larger" in line
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "m.onnx"]  # nothing but the inputs
