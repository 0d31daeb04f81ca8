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
    rows = [line for line in text.splitlines() if line.startswith("| 0.50 |")]
    assert len(rows) == 2
    for row in rows:
        accuracies = [float(cell) for cell in row.strip("|").split("|")[1:]]
        assert all(0.0 <= a <= 1.0 for a in accuracies)
