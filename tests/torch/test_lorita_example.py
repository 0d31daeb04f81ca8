"""examples/lorita_digits.py runs end to end (its --quick mode: few epochs, one budget)."""

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("sklearn")

pytestmark = pytest.mark.slow


def test_quick_run_prints_both_tables(tmp_path):
    out = tmp_path / "table.md"
    subprocess.run([sys.executable, "examples/lorita_digits.py", "--quick", "--out", str(out)], check=True,
                   capture_output=True, cwd=Path(__file__).resolve().parents[2], timeout=300)
    text = out.read_text()
    assert "### MLP" in text and "### ViT" in text
    def accuracies(line):
        return [float(cell) for cell in line.strip("|").split("|")[1:] if cell.strip()]

    mlp = text.split("### ViT")[0].splitlines()
    (dense,) = [accuracies(line) for line in mlp if line.startswith("| dense")]
    (half,) = [accuracies(line) for line in mlp if line.startswith("| 0.50 |")]
    assert min(dense) > 0.8  # even the quick run trains the MLP well past chance (0.1)
    svd, lorita_svd, feature_pca = half
    assert svd < min(dense) and feature_pca > svd  # truncating weights costs accuracy; feature PCA keeps more
