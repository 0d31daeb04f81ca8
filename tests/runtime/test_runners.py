import importlib.util

import numpy as np
import onnx
import pytest

from lrdeploy.errors import MissingDependencyError
from lrdeploy.runtime.onnxruntime import OrtRunner
from lrdeploy.runtime.tensorrt import TrtRunner
from tests import models


def test_ort_runner_runs_and_describes_itself(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(models.matmul_add(), path)
    x = np.ones((3, 64), np.float32)
    with OrtRunner(path, "cpu", threads=1) as runner:
        out = runner.infer({"x": x})
        assert runner.backend == "ort-cpu" and "onnxruntime" in runner.versions()
    expected = x @ models.random_weight(64, 96, 0)
    assert out["y"].shape == (3, 96)
    assert np.allclose(out["y"] - expected, (out["y"] - expected)[0], atol=1e-4)  # the same bias on every row
    assert runner.session is None


def test_ort_cuda_without_provider_names_the_fix(tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has the CUDA provider")
    path = tmp_path / "m.onnx"
    onnx.save(models.matmul_add(), path)
    with pytest.raises(MissingDependencyError, match=r"has no CUDAExecutionProvider .*install onnxruntime-gpu"):
        OrtRunner(path, "cuda").activate()


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="TensorRT is installed")
def test_trt_runner_without_tensorrt_names_the_fix(tmp_path):
    with pytest.raises(MissingDependencyError, match=r"TensorRT is not installed; .*pip install lrdeploy\[gpu\]"):
        TrtRunner(tmp_path / "x.engine").activate()


def test_torch_runner_matches_module_on_cpu():
    torch = pytest.importorskip("torch")
    from lrdeploy.runtime.torch import TorchRunner

    class Doubler(torch.nn.Module):
        def forward(self, x, scale):
            return {"y": x * 2 + scale.float()}

    with TorchRunner(Doubler(), device="cpu", precision="fp32") as runner:
        out = runner.infer({"x": np.arange(6, dtype=np.float32).reshape(2, 3), "scale": np.ones((2, 3), np.int64)})
    np.testing.assert_array_equal(out["y"], np.arange(6).reshape(2, 3) * 2 + 1)


@pytest.mark.gpu
def test_torch_runner_cuda_graphs_match_eager():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    from lrdeploy.runtime.torch import TorchRunner

    module = torch.nn.Linear(64, 32)
    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    with TorchRunner(module, device="cuda", precision="fp16", cuda_graphs=True) as graphed:
        a = graphed.infer({"input": x})
    with TorchRunner(module, device="cuda", precision="fp16", cuda_graphs=False) as eager:
        b = eager.infer({"input": x})
    np.testing.assert_allclose(a["output"], b["output"], rtol=1e-3, atol=1e-3)
