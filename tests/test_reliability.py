"""Bad and unusual inputs (issue 14): each is refused with one `Error:` line naming the fix, exit code 1, inputs
byte-identical afterwards and no output or temporary file left behind; or, where the input is recoverable,
the command succeeds."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from tests import models
from tests.conftest import snapshot as _snapshot

ROOT = Path(__file__).resolve().parents[1]


def _external_collision(d: Path) -> None:
    """model.onnx whose external data is named like the build's output data file."""
    onnx.save_model(models.transformer(), str(d / "model.onnx"), save_as_external_data=True,
                    location="model.lowrank.onnx.data", size_threshold=1024)


def _truncated_external(d: Path) -> None:
    onnx.save_model(models.transformer(), str(d / "ext.onnx"), save_as_external_data=True, location="ext.onnx.data",
                    size_threshold=1024)
    data = d / "ext.onnx.data"
    data.write_bytes(data.read_bytes()[:5000])


def _non_ssa(d: Path) -> None:
    """One tensor name produced twice (what torch's dynamo exporter writes when an output name is taken)."""
    model = models.matmul_add()
    model.graph.node.append(onnx.helper.make_node("Identity", ["xw"], ["xw"], name="again"))
    onnx.save(model, d / "nonssa.onnx")


def _opset(version: int):
    def write(d: Path) -> None:
        model = models.pooled_encoder(min(version, 17))
        model.opset_import[0].version = version
        onnx.save(model, d / f"opset{version}.onnx")
    return write


def _float_data(name: str, value: float):
    """matmul_add's float input with one bad value."""
    def write(d: Path) -> None:
        onnx.save(models.matmul_add(), d / "fc.onnx")
        x = np.random.default_rng(0).standard_normal((400, 64)).astype(np.float32)
        np.savez(d / "x_ok.npz", x=x)
        x[3, 5] = value
        np.savez(d / name, x=x)
    return write


def _masks(d: Path) -> None:
    arrays = models.transformer_inputs(96)
    np.savez(d / "zero_mask.npz", input_ids=arrays["input_ids"] * 0, attention_mask=arrays["attention_mask"] * 0)
    np.savez(d / "big_ids.npz", input_ids=arrays["input_ids"] + 1000, attention_mask=arrays["attention_mask"])


def _static_batch(d: Path) -> None:
    model = models.matmul_add()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 1
    onnx.save(model, d / "static.onnx")
    onnx.save(models.gemm(), d / "gemm.onnx")


SETUPS = {"collision": _external_collision, "truncated": _truncated_external, "nonssa": _non_ssa,
          "opset99": _opset(99), "nan": _float_data("x_nan.npz", np.nan), "inf": _float_data("x_inf.npz", np.inf),
          "huge": _float_data("x_huge.npz", 1e30), "masks": _masks, "static": _static_batch, "none": lambda d: None}

# (case, setup, arguments: {d} the work folder, {model}/{calib} the tiny transformer and its data; message regex)
ERROR_CASES = [
    ("1 output over the input's external data", "collision", ["build", "{d}/model.onnx", "--calib", "{calib}"],
     r"output .*model.lowrank.onnx.data would overwrite the input .*model.lowrank.onnx.data; choose another -o"),
    ("2 all-zero attention mask", "masks", ["build", "{model}", "--calib", "{d}/zero_mask.npz"],
     r"96 of 96 samples have an all-zero 'attention_mask' \(no real token\)"),
    ("2 all-zero mask in --eval", "masks", ["build", "{model}", "--calib", "{calib}", "--eval", "{d}/zero_mask.npz"],
     r"evaluation file .*: 96 of 96 samples have an all-zero 'attention_mask'"),
    ("4 NaN in calibration data", "nan", ["build", "{d}/fc.onnx", "--calib", "{d}/x_nan.npz"],
     r"input 'x' holds 1 NaN or infinite values; replace or drop those samples"),
    ("4 Inf in calibration data", "inf", ["build", "{d}/fc.onnx", "--calib", "{d}/x_inf.npz"],
     r"input 'x' holds 1 NaN or infinite values"),
    ("4 1e30 in calibration data", "huge", ["build", "{d}/fc.onnx", "--calib", "{d}/x_huge.npz"],
     r"the statistics of 'x' are not finite \(NaN or overflow\).*check them for huge values"),
    ("4 NaN in --eval", "nan", ["build", "{d}/fc.onnx", "--calib", "{d}/x_ok.npz", "--eval", "{d}/x_nan.npz"],
     r"evaluation file .*x_nan.npz: input 'x' holds 1 NaN"),
    ("6 opset 99", "opset99", ["build", "{d}/opset99.onnx", "--calib", "{calib}"],
     r"uses ONNX opset 99, outside the 11–\d+ lrdeploy supports; re-export it"),
    ("7 not SSA: build", "nonssa", ["build", "{d}/nonssa.onnx", "--calib", "random"],
     r"is not a valid ONNX model: Graph must be in single static assignment \(SSA\) form"),
    ("7 not SSA: inspect", "nonssa", ["inspect", "{d}/nonssa.onnx"], r"single static assignment"),
    ("8 truncated external data: build", "truncated", ["build", "{d}/ext.onnx", "--calib", "{calib}"],
     r"external data file 'ext.onnx.data' is truncated: tensor .* needs bytes up to \d+ but the file has 5000"),
    ("8 truncated external data: bench", "truncated", ["bench", "{d}/ext.onnx"], r"'ext.onnx.data' is truncated"),
    ("9 token ids outside the embedding (--eval)", "masks", ["build", "{model}", "--calib", "{calib}", "--eval",
     "{d}/big_ids.npz"], r"input 'input_ids' holds ids from 1000 to 1099 but the model's table has 100 rows"),
    ("10 static batch, --batch 1,8", "static", ["bench", "{d}/static.onnx", "--batch", "1,8"],
     r"input 'x' has a fixed batch of 1; bench it with --batch 1"),
    ("10 two models, different inputs", "none", ["bench", "{model}", "{d}/../fc_other.onnx"],
     r"the models take different inputs \(input_ids int64 rank 2, attention_mask int64 rank 2\) vs \(x float32"),
    ("10 --batch 100000000", "none", ["bench", "{model}", "--batch", "100000000"],
     r"--batch 100000000 × --seq 128 needs [\d.]+ GiB for the inputs alone, more than this machine's"),
    ("12 top-k target on a per-token output", "none", ["sweep", "{model}", "--calib", "{calib}", "--output",
     "last_hidden_state", "--target-metric", "topk_agreement=0.8"],
     r"topk_agreement is measured only for outputs of one vector per sample .*'last_hidden_state' has rank 3"),
    ("14 --target-cosine 1.5", "none", ["sweep", "{model}", "--calib", "{calib}", "--target-cosine", "1.5"],
     r"--target-cosine 1.5 is outside \(0, 1\]"),
    ("14 --target-cosine nan", "none", ["sweep", "{model}", "--calib", "{calib}", "--target-cosine", "nan"],
     r"--target-cosine nan is outside \(0, 1\]"),
    ("14 --target-cosine 0", "none", ["sweep", "{model}", "--calib", "{calib}", "--target-cosine", "0"],
     r"--target-cosine 0.0 is outside \(0, 1\]"),
    ("14 --target-cosine -0.5", "none", ["sweep", "{model}", "--calib", "{calib}", "--target-cosine", "-0.5"],
     r"--target-cosine -0.5 is outside \(0, 1\]"),
    ("14 --target-metric above one", "none", ["sweep", "{model}", "--calib", "{calib}", "--target-metric",
     "cosine_p5=2"], r"--target-metric 'cosine_p5=2': 2.0 is outside \(0, 1\]"),
    ("16 --shape of an unknown input", "none", ["build", "{model}", "--shape", "token_ids:1x16"],
     r"--shape names 'token_ids', which is not a model input \(input_ids, attention_mask\)"),
    ("16 --atol -1", "none", ["build", "{model}", "--calib", "{calib}", "--atol", "-1"],
     r"--atol -1.0 is not a tolerance; give a finite number ≥ 0"),
    ("16 --rtol nan", "none", ["build", "{model}", "--calib", "{calib}", "--rtol", "nan"],
     r"--rtol nan is not a tolerance"),
    ("17 early error with a new -o", "none", ["build", "{model}", "--calib", "{calib}", "--rank-budget", "0.01",
     "-o", "{d}/new/out"], r"rank budget 0.01 is below what the smallest rank"),
]


@pytest.fixture
def work(tmp_path):
    """A work folder beside the tiny transformer and its calibration data; a float model one level up."""
    d = tmp_path / "work"
    d.mkdir()
    onnx.save(models.transformer(), tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", **models.transformer_inputs(96))
    onnx.save(models.matmul_add(), tmp_path / "fc_other.onnx")
    return d


@pytest.mark.parametrize("setup, args, message", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_bad_input_is_one_error_line_and_changes_nothing(work, setup, args, message):
    SETUPS[setup](work)
    before = _snapshot(work.parent)
    result = CliRunner().invoke(main, [a.format(d=work, model=work.parent / "tiny.onnx",
                                                calib=work.parent / "calib.npz") for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert _snapshot(work.parent) == before  # inputs byte-identical, no output, no temporary file


@pytest.mark.parametrize("opset", [11, 12, 13, 14])
def test_older_opsets_build(work, opset):
    """6: calibration's graph is written for the model's opset (before: opset 11/12 failed in ONNX Runtime)."""
    onnx.save(models.pooled_encoder(opset), work / "m.onnx")
    np.savez(work / "c.npz", **models.transformer_inputs(96))
    result = CliRunner().invoke(main, ["build", str(work / "m.onnx"), "--calib", str(work / "c.npz"), "-o",
                                       str(work / "out"), "--allocation", "sensitivity", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["params"]["linear_ratio"] <= 0.5
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.9
    assert onnx.load(str(work / "out" / "m.lowrank.onnx")).opset_import[0].version == opset


@pytest.mark.parametrize("damage", ["truncated", "empty", "bit flip"])
def test_damaged_cache_entries_are_recomputed(work, isolated_cache, damage):
    """3: an unreadable or inconsistent cache entry is recomputed (checksummed), never trusted or fatal."""
    model, calib = work.parent / "tiny.onnx", work.parent / "calib.npz"
    first = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "-o", str(work / "a"), "--json"])
    assert first.exit_code == 0, first.output
    (entry,) = isolated_cache.glob("*.npz")
    data = entry.read_bytes()
    entry.write_bytes({"truncated": data[: len(data) // 2], "empty": b"",
                       "bit flip": data[:2000] + bytes([data[2000] ^ 1]) + data[2001:]}[damage])
    second = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "-o", str(work / "b"), "--json"])
    assert second.exit_code == 0, second.output
    assert "statistics from cache" not in second.stderr
    assert json.loads(second.stdout)["layers"] == json.loads(first.stdout)["layers"]
    third = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "-o", str(work / "c")])
    assert "statistics from cache" in third.output  # the recomputed entry was stored again


def test_busy_output_folder_is_refused(work):
    """5: a second run into a folder another run is writing is refused; the first run's files stay its own."""
    out = work / "out"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a concurrent lrdeploy run holds
    try:
        result = CliRunner().invoke(main, ["build", str(work.parent / "tiny.onnx"), "--calib",
                                           str(work.parent / "calib.npz"), "-o", str(out)])
    finally:
        os.close(fd)
    assert result.exit_code == 1
    assert re.search(r"output directory .*out is in use by another lrdeploy run; wait for it", result.stderr)
    assert list(out.iterdir()) == []


def test_full_disk_leaves_no_output(work):
    """13: a write that fails (here: file size limit) is one Error line and leaves no part of the output set."""
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (60000, 60000)); "
            "from lrdeploy.cli import main; sys.argv = ['lrdeploy'] + sys.argv[1:]; main()")
    out = work / "out"
    result = subprocess.run([sys.executable, "-c", code, "build", str(work.parent / "tiny.onnx"), "--calib",
                             str(work.parent / "calib.npz"), "-o", str(out), "--no-cache"],
                            capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1, result.stderr
    assert re.fullmatch(r"Error: cannot write to output directory .*out \(File too large\); choose another with "
                        r"-o/--output-dir\n", result.stderr), result.stderr
    assert not out.exists()


def test_ctrl_c_exits_130_and_keeps_nothing(work, monkeypatch):
    """17: Ctrl-C during a build exits 130, as shells expect, and removes the interrupted output set."""
    import lrdeploy.pipeline.build as build_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_module, "compare_models", interrupted)  # after the model is written to the stage
    out = work / "out"
    result = CliRunner().invoke(main, ["build", str(work.parent / "tiny.onnx"), "--calib",
                                       str(work.parent / "calib.npz"), "-o", str(out)])
    assert result.exit_code == 130
    assert "Interrupted" in result.stderr
    assert not out.exists()


def test_eval_same_as_calib_warns(work):
    """16: --eval naming the --calib file builds, and says the accuracy is on calibration samples."""
    calib = work.parent / "calib.npz"
    result = CliRunner().invoke(main, ["build", str(work.parent / "tiny.onnx"), "--calib", str(calib), "--eval",
                                       str(calib), "-o", str(work / "out")])
    assert result.exit_code == 0, result.output
    warning = "--eval names the same file as --calib, so the accuracy is measured on calibration samples"
    assert warning in " ".join(result.output.split())
    assert warning in json.loads((work / "out" / "report.json").read_text())["warnings"][0]


def test_layer_names_with_newlines_keep_the_markdown_table(work):
    """17: a layer named with a newline or a pipe is one table row in report.md."""
    model = models.matmul_add()
    model.graph.node[0].name = "fc\nodd|name"
    onnx.save(model, work / "odd.onnx")
    np.savez(work / "x.npz", x=np.random.default_rng(0).standard_normal((400, 64)).astype(np.float32))
    result = CliRunner().invoke(main, ["build", str(work / "odd.onnx"), "--calib", str(work / "x.npz"), "-o",
                                       str(work / "out")])
    assert result.exit_code == 0, result.output
    rows = [line for line in (work / "out" / "report.md").read_text().splitlines() if line.startswith("| fc")]
    assert rows == [rows[0]] and rows[0].startswith("| fc odd\\|name | MatMul+Add | 64 | 96 |")


def test_builds_are_deterministic(work):
    """The same model, data and options give a byte-identical compressed model (sensitivity and refit too)."""
    digests = []
    for run in ("a", "b"):
        result = CliRunner().invoke(main, ["build", str(work.parent / "tiny.onnx"), "--calib",
                                           str(work.parent / "calib.npz"), "-o", str(work / run), "--allocation",
                                           "sensitivity", "--refit", "--no-cache"])
        assert result.exit_code == 0, result.output
        digests.append(hashlib.sha256((work / run / "tiny.lowrank.onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
