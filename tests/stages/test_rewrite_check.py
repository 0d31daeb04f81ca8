"""A rewrite the report claims but the written model lacks is an internal error, never a success: the report's
removed parameters are checked against the matrices of the model actually written."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from lrdeploy.errors import InternalError
from lrdeploy.onnx_io import count_parameters, matrix_elements
from lrdeploy.report.model import LayerRecord
from lrdeploy.stages.rewrite_check import check_claimed_changes
from tests import models


def _record(status: str, before: int, after: int) -> LayerRecord:
    return LayerRecord("layer", "MatMul", 8, 8, None, before, after, status, "")


def test_changes_the_file_does_not_show_are_an_internal_error():
    layers = [_record("dropped", 64, 0), _record("factorized", 64, 32), _record("dense", 64, 64)]
    check_claimed_changes(1000, 1000 - 96, layers)  # exactly what was claimed
    check_claimed_changes(1000, 1000 - 200, layers)  # more (a drop also removes a position table)
    with pytest.raises(InternalError, match="claims 96 weight parameters removed, but the written model's matrices "
                                            "shrank by 0"):
        check_claimed_changes(1000, 1000, layers)


def test_matrix_elements_count_float_matrices_only():
    """Weights and embedding tables count; biases, norms and int64 shape constants do not."""
    model = models.transformer(layers=1, hidden=64, heads=4, ffn=256, vocab=100)
    matrices = [init for init in model.graph.initializer if len(init.dims) == 2]
    assert {tuple(init.dims) for init in matrices} >= {(64, 64), (64, 256), (256, 64)}
    assert matrix_elements(model) == sum(int(np.prod(init.dims)) for init in matrices) < count_parameters(model)


def test_a_build_whose_drop_did_not_happen_fails(tmp_path, monkeypatch):
    """The rewrite is made to return the graph unchanged while the plan drops a block: the build stops with the
    internal error and publishes nothing."""
    import lrdeploy.pipeline.build as build_module

    model = tmp_path / "t.onnx"
    onnx.save(models.transformer(layers=3), model)
    np.savez(tmp_path / "c.npz", **models.transformer_inputs(96))
    monkeypatch.setattr(build_module, "compressed_model", lambda proto, *args: proto)
    args = ["build", str(model), "--calib", str(tmp_path / "c.npz"), "--drop-blocks", "1", "--rank-budget", "1",
            "-o", str(tmp_path / "o")]
    result = CliRunner().invoke(main, args)
    assert isinstance(result.exception, InternalError), result.output
    assert "a rewrite did not happen as reported" in str(result.exception) and "(dropped)" in str(result.exception)
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())
    monkeypatch.undo()
    result = CliRunner().invoke(main, args + ["--json"])  # the real rewrite passes the same check
    assert result.exit_code == 0, result.output
    assert sum(layer["status"] == "dropped" for layer in json.loads(result.stdout)["layers"]) == 6
