"""Fixed cuts compose: a block chosen to be dropped is gone, and no other cut of it is made or reported."""

import numpy as np
import onnx
import pytest

from tests import models
from tests.conftest import built_cut, run_model


@pytest.mark.parametrize("cut, kept_per_block", [
    (["--heads-keep", "0.5"], 3 * 64 * 32 + 32 * 64 + 2 * 64 * 256),  # Q, K, V and O at 2 of 4 heads; FFN dense
    (["--values-keep", "0.5"], 2 * 64 * 64 + 2 * 64 * 32 + 2 * 64 * 256),  # Q, K in full; V and O 8 of 16 wide
])
def test_a_dropped_block_is_not_cut_again(tmp_path, cut, kept_per_block):
    model, calib = tmp_path / "tiny.onnx", tmp_path / "calib.npz"
    onnx.save(models.transformer(layers=3), model)
    np.savez(calib, **models.transformer_inputs(96))
    report, _ = built_cut(model, calib, tmp_path / "o", *cut, "--drop-blocks", "1", "--rank-budget", "1")
    dropped = {layer["name"] for layer in report["layers"] if layer["status"] == "dropped"}
    assert len(dropped) == 6 and all(name.startswith("layer0/") for name in dropped)
    assert report["params"]["linear_after"] == 2 * kept_per_block
    written = onnx.load(str(tmp_path / "o" / "tiny.lowrank.onnx"))
    assert not [i.name for i in written.graph.initializer if i.name.startswith("layer0/")]
    weights = sum(int(np.prod(i.dims)) for i in written.graph.initializer if len(i.dims) == 2 and 1 not in i.dims)
    assert weights - 100 * 64 == 2 * kept_per_block  # less the embedding table (vocab 100)
    assert np.isfinite(run_model(written, models.transformer_inputs(4, seed=3))[0]).all()
