"""Shared fixtures: tiny models on disk, their calibration inputs, and an isolated statistics cache."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from tests import models


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path_factory, monkeypatch):
    """Never touch the user's ~/.cache/lrdeploy from tests."""
    cache = tmp_path_factory.mktemp("cache")
    monkeypatch.setenv("LRDEPLOY_CACHE_DIR", str(cache))
    return cache


@pytest.fixture
def transformer_files(tmp_path):
    """(model path, calibration npz path) for the two-layer tiny transformer."""
    model_path = tmp_path / "tiny.onnx"
    onnx.save(models.transformer(), model_path)
    calib_path = tmp_path / "calib.npz"
    np.savez(calib_path, **models.transformer_inputs(96))
    return model_path, calib_path


def snapshot(folder) -> dict[str, str]:
    """Every file (hidden ones too) and folder below `folder`, with file digests: equal snapshots before and after a
    run mean it changed nothing and left nothing behind."""
    import hashlib

    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def run_model(model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """Outputs of an ONNX model (ModelProto or path) on ONNX Runtime CPU."""
    from lrdeploy.runtime.onnxruntime import create_session

    session = create_session(model, threads=1)
    return session.run(None, feeds)


def built_cut(model, calib, out, *options) -> tuple[dict, dict[str, dict]]:
    """`lrdeploy build MODEL --calib CALIB OPTIONS -o OUT --json`: its report and its narrowed layers by name."""
    import json

    from click.testing import CliRunner

    from lrdeploy.cli import main

    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), *options, "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    return report, {layer["name"]: layer for layer in report["layers"] if layer["status"] == "narrowed"}
