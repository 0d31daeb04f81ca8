"""benchmarks/tools/gpu_lowrank.py must work when a GPU session runs it; on CPU its --quick mode proves the plumbing."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")


def test_quick_cpu_run_writes_results(tmp_path):
    out = tmp_path / "r.json"
    subprocess.run([sys.executable, "benchmarks/tools/gpu_lowrank.py", "--device", "cpu", "--quick", "--json", str(out)],
                   check=True, capture_output=True, cwd=Path(__file__).resolve().parents[2])
    data = json.loads(out.read_text())
    assert [(r["d_in"], r["rank"]) for r in data["gemm"]] == [(64, 16), (64, 17)]
    assert data["gemm"][0]["flop_ratio"] == 0.5 and data["gemm"][0]["ratio_p50"] > 0
    assert [(r["model"], r["budget"], r["batch"]) for r in data["encoders"]] == [("tiny", 0.5, 1)]
    assert data["cuda_graphs"] is False and data["precision"] == "fp32" and "no host↔device copy" in data["timed"]
