"""Never lose a file (issue 24): no command writes over its inputs, a run deletes only what it made, its outputs
appear all together or not at all, and SIGTERM cleans up like Ctrl-C. Each case failed before its fix."""

from __future__ import annotations

import os
import re
import shutil
import signal
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


def _run(*args) -> object:
    return CliRunner().invoke(main, [str(a) for a in args])


def _one_error_line(result, pattern: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), result.exception  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and re.search(pattern, lines[0]), result.stderr


@pytest.fixture
def work(tmp_path):
    d = tmp_path / "work"
    d.mkdir()
    onnx.save(models.transformer(), d / "m.onnx")
    np.savez(d / "calib.npz", **models.transformer_inputs(96))
    onnx.save_model(models.transformer(), str(d / "ext.onnx"), save_as_external_data=True, location="bench.md",
                    size_threshold=1024)  # external data named like one of bench's outputs
    (d / "hf").mkdir()
    (d / "hf" / "config.json").write_text('{"model_type": "bert"}')
    os.link(d / "m.onnx", d / "hardlink.onnx")
    shutil.copy(d / "m.onnx", d / ("m" * 235 + ".onnx"))
    return d


OVERWRITES = [
    ("profile -o its model", ["profile", "{d}/m.onnx", "-o", "{d}/m.onnx"], r"output .*m.onnx would overwrite the input"),
    ("profile -o a hard link of its model", ["profile", "{d}/m.onnx", "-o", "{d}/hardlink.onnx"],
     r"would overwrite the input .*m.onnx"),
    ("profile -o an existing folder", ["profile", "{d}/m.onnx", "-o", "{d}/hf"], r"-o/--output .*hf is a folder"),
    ("engine -o its model", ["engine", "{d}/m.onnx", "-o", "{d}/m.onnx"], r"output .*m.onnx would overwrite the input"),
    ("engine --timing-cache its model", ["engine", "{d}/m.onnx", "-o", "{d}/m.engine", "--timing-cache", "{d}/m.onnx"],
     r"would overwrite the input .*m.onnx; choose another --timing-cache"),
    ("bench over its model's external data", ["bench", "{d}/ext.onnx", "-o", "{d}"],
     r"output .*bench.md would overwrite the input .*bench.md"),
    ("export -o a file of the model folder", ["export", "--hf", "{d}/hf", "-o", "{d}/hf/config.json"],
     r"output .*config.json would overwrite the input"),
    ("export -o a folder", ["export", "--hf", "{d}/hf", "-o", "{d}"], r"-o/--output .*work is a folder"),
    ("profile -o a 250-character name", ["profile", "{d}/m.onnx", "-o", "{d}/" + "p" * 245 + ".json"],
     r"output file name p+… is too long \(250 bytes"),
    ("build a model of a 240-character name", ["build", "{d}/" + "m" * 235 + ".onnx", "--calib", "{d}/calib.npz"],
     r"output file name m+… is too long \(\d+ bytes; at most 231 here\); give the model a shorter file name"),
]


@pytest.mark.parametrize("args, message", [c[1:] for c in OVERWRITES], ids=[c[0] for c in OVERWRITES])
def test_no_command_writes_over_its_inputs(work, args, message):
    before = _snapshot(work)
    _one_error_line(_run(*[a.format(d=work) for a in args]), message)
    assert _snapshot(work) == before


def _sweep_folder(tmp_path: Path) -> Path:
    """S/rho_1.000/ as an earlier sweep left it, now holding the user's input model, its data and notes."""
    folder = tmp_path / "S" / "rho_1.000"
    folder.mkdir(parents=True)
    onnx.save(models.transformer(), folder / "tiny.lowrank.onnx")
    np.savez(folder / "calib.npz", **models.transformer_inputs(96))
    (folder / "report.json").write_text('{"old": true}')
    (folder / "NOTES.txt").write_text("my notes")
    return folder


def test_a_bisection_deletes_nothing_it_did_not_make(tmp_path):
    folder = _sweep_folder(tmp_path)
    before = _snapshot(folder)
    result = _run("sweep", folder / "tiny.lowrank.onnx", "--calib", folder / "calib.npz", "--target-cosine", "0.5",
                  "--bench-batch", "0", "-o", tmp_path / "S")
    assert result.exit_code == 0, result.output
    assert _snapshot(folder) == before  # the input, its data, the old report and the notes, byte-identical
    assert (tmp_path / "S" / "tiny.lowrank.lowrank.onnx").is_file()  # the chosen model, and nothing else of it
    assert sorted(p.name for p in (tmp_path / "S").iterdir() if p.name.startswith("rho_")) == ["rho_1.000"]


def test_a_sweep_merges_into_existing_budget_folders(tmp_path):
    folder = _sweep_folder(tmp_path)
    model = tmp_path / "tiny.onnx"
    onnx.save(models.transformer(), model)
    result = _run("sweep", model, "--calib", folder / "calib.npz", "--budgets", "1,0.5", "--bench-batch", "0",
                  "-o", tmp_path / "S")
    assert result.exit_code == 0, result.output
    assert (folder / "NOTES.txt").read_text() == "my notes"  # not this run's: untouched
    assert '"old"' not in (folder / "report.json").read_text()  # this run's report replaces its namesake
    assert (folder / "calib.npz").is_file()  # not this run's: untouched
    assert (tmp_path / "S" / "rho_0.500" / "tiny.lowrank.onnx").is_file()


def test_interrupted_sweep_keeps_no_budget(tmp_path, monkeypatch):
    import lrdeploy.pipeline.build as build_module

    calls = []
    real = build_module.compare_models

    def interrupted_second(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "compare_models", interrupted_second)
    onnx.save(models.transformer(), tmp_path / "tiny.onnx")
    np.savez(tmp_path / "calib.npz", **models.transformer_inputs(96))
    result = _run("sweep", tmp_path / "tiny.onnx", "--calib", tmp_path / "calib.npz", "--budgets", "0.9,0.7",
                  "--bench-batch", "0", "-o", tmp_path / "out")
    assert result.exit_code == 130 and "nothing of this run's outputs was kept" in result.stderr
    assert not (tmp_path / "out").exists()  # rho_0.900 was built in the stage, and went with it


def test_a_folder_in_the_way_stops_the_run_before_any_output_is_replaced(work):
    out = work / "out"
    out.mkdir()
    (out / "report.json").write_text("old json")
    (out / "report.html").write_text("old html")
    (out / "report.md").mkdir()
    before = _snapshot(out)
    result = _run("build", work / "m.onnx", "--calib", work / "calib.npz", "--rank-budget", "0.4", "-o", out)
    _one_error_line(result, r"cannot write .*report.md: a folder of that name is in the way")
    assert _snapshot(out) == before


def test_publishing_puts_back_what_it_replaced_when_a_move_fails(tmp_path, monkeypatch):
    from lrdeploy import files

    out, stage = tmp_path / "out", tmp_path / "out" / ".stage"
    (stage / "sub").mkdir(parents=True)
    (out / "a.txt").write_text("old a")
    (stage / "a.txt").write_text("new a")
    (stage / "sub" / "b.txt").write_text("new b")
    real, moves = os.replace, []

    def failing_second(source, target):
        moves.append(target)
        if len(moves) == 2:
            raise OSError(5, "Input/output error")
        return real(source, target)

    monkeypatch.setattr(files.os, "replace", failing_second)
    with pytest.raises(OSError):
        files.publish(stage, out)
    monkeypatch.setattr(files.os, "replace", real)
    assert (out / "a.txt").read_text() == "old a" and not (out / "sub").exists()
    assert sorted(p.name for p in out.iterdir()) == [".stage", "a.txt"]  # no backup left behind


def test_sigterm_cleans_up_like_ctrl_c(work):
    """SIGTERM (kill, docker stop, CI time-outs) during validation: exit 143, no staged model left in -o."""
    code = ("import os, signal, sys, time; import lrdeploy.pipeline.build as b; "
            "b.compare_models = lambda *a, **k: (os.kill(os.getpid(), signal.SIGTERM), time.sleep(30)); "
            "from lrdeploy.cli import main; sys.argv = ['lrdeploy'] + sys.argv[1:]; main()")
    out = work / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    result = subprocess.run([sys.executable, "-c", code, "build", str(work / "m.onnx"), "--calib",
                             str(work / "calib.npz"), "-o", str(out), "--no-cache"],
                            capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert "Interrupted (SIGTERM)" in result.stderr
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_hugging_face_cache_links_are_read_as_beside_the_model(tmp_path):
    """The hub cache keeps model.onnx and model.onnx.data as links into ../../blobs/: the data is beside the model."""
    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc123"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    onnx.save_model(models.transformer(), str(blobs / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=1024)
    shutil.move(blobs / "model.onnx", blobs / "1111")
    shutil.move(blobs / "model.onnx.data", blobs / "2222")
    (snapshot / "model.onnx").symlink_to("../../blobs/1111")
    (snapshot / "model.onnx.data").symlink_to("../../blobs/2222")
    np.savez(tmp_path / "calib.npz", **models.transformer_inputs(96))
    result = _run("build", snapshot / "model.onnx", "--calib", tmp_path / "calib.npz", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.lowrank.onnx").is_file()


def test_export_creates_missing_folders_and_removes_them_when_it_fails(tmp_path):
    """`export -o no/such/folder/m.onnx` makes the folders (as `build -o` does); a failed export removes them."""
    made = _run("export", "--factory", "tests.factories:tiny_mlp", "-o", tmp_path / "a" / "b" / "m.onnx")
    assert made.exit_code == 0, made.output
    assert (tmp_path / "a" / "b" / "m.onnx").is_file()
    failed = _run("export", "--factory", "tests.factories:tiny_mlp", "--tolerance", "-1", "-o",
                  tmp_path / "c" / "d" / "m.onnx")
    assert failed.exit_code == 1 and failed.stderr.startswith("Error: "), failed.output
    assert not (tmp_path / "c").exists()


def _scalar_output(d: Path) -> None:
    model = models.matmul_add()
    model.graph.node.append(onnx.helper.make_node("ReduceSum", [model.graph.output[0].name], ["total"], keepdims=0,
                                                  name="sum"))
    model.graph.output.append(onnx.helper.make_tensor_value_info("total", onnx.TensorProto.FLOAT, []))
    onnx.save(model, d / "scalar_out.onnx")


def _scalar_input(d: Path) -> None:
    model = models.matmul_add()
    model.graph.input.append(onnx.helper.make_tensor_value_info("scale", onnx.TensorProto.FLOAT, []))
    model.graph.node.append(onnx.helper.make_node("Mul", [model.graph.output[0].name, "scale"], ["scaled"], name="mul"))
    model.graph.output[0].name = "scaled"
    onnx.save(model, d / "scalar_in.onnx")


def _duplicate_node_names(d: Path) -> None:
    model = models.transformer()
    model.graph.node[3].name = model.graph.node[2].name  # onnx's checker passes it; ONNX Runtime does not
    onnx.save(model, d / "dup.onnx")


def _bad_loop_body(d: Path) -> None:
    """A Loop whose body returns fewer outputs than the Loop carries: onnx's checker passes it, ONNX Runtime not."""
    from onnx import TensorProto, helper, numpy_helper

    model = models.matmul_add()
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"], name="body/Identity")], "body",
                             [helper.make_tensor_value_info("iter", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
                              helper.make_tensor_value_info("carried", TensorProto.FLOAT, None)],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    model.graph.initializer.extend([numpy_helper.from_array(np.array(2, np.int64), "trip"),
                                    numpy_helper.from_array(np.array(True), "cond")])
    model.graph.node.append(helper.make_node("Loop", ["trip", "cond", model.graph.output[0].name], ["looped"],
                                             body=body, name="loop"))
    model.graph.output[0].name = "looped"
    onnx.save(model, d / "loop.onnx")


TRACEBACKS = [  # (case, setup, arguments, message): each was a traceback before
    ("14 a profile without the model's shapes", None, ["build", "{d}/m.onnx", "--calib", "{d}/calib.npz",
     "--target-latency", "0.6", "--profile", "h200-fp16", "--rank-multiple", "16"],
     r"profile h200-fp16 .* has no timing for 3 of this model's 3 layer shapes \(64×64, 64×256, 256×64\); measure "
     r"them on your device with `lrdeploy profile"),
    ("15 a scalar output", _scalar_output, ["build", "{d}/scalar_out.onnx", "--calib", "random", "--shape", "x:4x64"],
     r"model output 'total' is a scalar \(rank 0\); .* export the model with a batch axis"),
    ("15 a scalar input", _scalar_input, ["build", "{d}/scalar_in.onnx", "--calib", "random", "--shape", "x:4x64"],
     r"model input 'scale' is a scalar \(rank 0\)"),
    ("16 ONNX Runtime refuses the model", _duplicate_node_names, ["build", "{d}/dup.onnx", "--calib", "{d}/calib.npz"],
     r"ONNX Runtime cannot load the model: This is an invalid model. Error: two nodes with same node name"),
    ("16 a bad Loop body", _bad_loop_body, ["build", "{d}/loop.onnx", "--calib", "random", "--shape", "x:4x64",
                                            "--plan", "lowrank"],
     r"ONNX Runtime cannot load the model: .*Node \(loop\) Op \(Loop\) \[TypeInferenceError\]"),
    ("19 profile --tokens 200000000", None, ["profile", "--tokens", "200000000", "-o", "{d}/p.json"],
     r"timing 200000000 tokens of width 768 needs [\d.]+ GiB for the inputs alone, .*; lower --tokens"),
]


@pytest.mark.parametrize("setup, args, message", [c[1:] for c in TRACEBACKS], ids=[c[0] for c in TRACEBACKS])
def test_what_was_a_traceback_is_one_error_line(work, setup, args, message):
    if setup is not None:
        setup(work)
    before = _snapshot(work)
    _one_error_line(_run(*[a.format(d=work) for a in args]), message)
    assert _snapshot(work) == before


def _lrdeploy(*args) -> subprocess.CompletedProcess:
    """The installed command line in a fresh process (what a shell or `| jq` sees)."""
    code = "import sys; from lrdeploy.cli import main; sys.argv = ['lrdeploy'] + sys.argv[1:]; main()"
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def test_json_stdout_holds_the_document_alone(work):
    """7: with --json, stdout is the JSON document and nothing else (Polygraphy's notices go to stderr); an error
    is a JSON object there and one Error line on stderr."""
    import json

    built = _lrdeploy("build", work / "m.onnx", "--calib", "random", "--shape", "input_ids:2x8", "--shape",
                      "attention_mask:2x8", "--plan", "lowrank", "-o", work / "o", "--json", "--no-cache")
    assert built.returncode == 0, built.stderr
    assert json.loads(built.stdout)["config"]["rank_budget"] == 0.5
    failed = _lrdeploy("build", work / "missing.onnx", "--json")
    assert failed.returncode == 1
    assert failed.stdout.endswith("}\n") and json.loads(failed.stdout) == {"error": f"model file {work / 'missing.onnx'} does not exist; check the path",
                                         "type": "ModelLoadError"}
    assert failed.stderr.splitlines() == [f"Error: model file {work / 'missing.onnx'} does not exist; check the path"]


def _bias_of_rank_three() -> onnx.ModelProto:
    """x [n, 64] ─MatMul─Add(b [1, 1, 96])─Relu─MatMul─Add(b [1, 1, 64])─► y [1, n, 64]: the bias broadcasts the
    output to rank 3."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    arrays = {"w1": rng.standard_normal((64, 96)), "b1": rng.standard_normal((1, 1, 96)),
              "w2": rng.standard_normal((96, 64)), "b2": rng.standard_normal((1, 1, 64))}
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="fc1/MatMul"),
             helper.make_node("Add", ["h", "b1"], ["h1"], name="fc1/Add"),
             helper.make_node("Relu", ["h1"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y0"], name="fc2/MatMul"),
             helper.make_node("Add", ["y0", "b2"], ["y"], name="fc2/Add")]
    graph = helper.make_graph(nodes, "bias3", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 64])],
                              [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()])
    return onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])


@pytest.mark.parametrize("cut", [["--plan", "lowrank"], ["--ffn-keep", "0.5", "--rank-budget", "1"]])
def test_a_bias_that_broadcasts_the_output_keeps_its_shape(tmp_path, cut):
    """13: a [1, 1, d] bias was folded into a [d] one, so the rewritten output lost an axis."""
    from tests.conftest import run_model

    onnx.save(_bias_of_rank_three(), tmp_path / "b3.onnx")
    x = np.random.default_rng(1).standard_normal((300, 64)).astype(np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    result = _run("build", tmp_path / "b3.onnx", "--calib", tmp_path / "x.npz", "--rank-budget", "0.5", *cut,
                  "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    feed = {"x": x[:7]}
    assert run_model(tmp_path / "o" / "b3.lowrank.onnx", feed)[0].shape == (1, 7, 64)


def test_a_busy_output_folder_is_refused_before_any_work(work, monkeypatch):
    """11: the -o lock is taken at the start: a second run into a busy folder does no calibration at all."""
    import fcntl

    import lrdeploy.pipeline.build as build_module

    monkeypatch.setattr(build_module, "calibrate", lambda *a, **k: pytest.fail("calibrated into a busy folder"))
    out = work / "busy"
    out.mkdir()
    fd = os.open(out, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # what a concurrent lrdeploy run holds
    try:
        result = _run("build", work / "m.onnx", "--calib", work / "calib.npz", "-o", out)
    finally:
        os.close(fd)
    _one_error_line(result, r"output directory .*busy is in use by another lrdeploy run")


@pytest.mark.parametrize("args, message", [
    (["--ffn-keep", "1.5"], r"--ffn-keep 1.5 is outside \(0, 1\]"),
    (["--target-latency", "0.7", "--ffn-keep", "0.5"], r"--ffn-keep cannot be combined with --target-latency"),
])
def test_distill_checks_every_option_before_it_writes(work, args, message):
    """10: distill's options were checked after the export and tokenisation had written into -o."""
    before = _snapshot(work)
    _one_error_line(_run("distill", "--hf", work / "hf", *args, "-o", work / "out"), message)
    assert _snapshot(work) == before


def test_distill_of_a_folder_that_is_no_model_leaves_nothing(work):
    (work / "notes").mkdir()
    before = _snapshot(work)
    _one_error_line(_run("distill", "--hf", work / "notes", "-o", work / "out"),
                    r"notes is not a Hugging Face model folder \(no config.json\)")
    assert _snapshot(work) == before


def _computed_weight(op: str) -> onnx.ModelProto:
    """x ─MatMul(W)─► y with W computed at run time from a constant: Cast of FP16, or DequantizeLinear of int8."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    if op == "Cast":
        inits = [numpy_helper.from_array(rng.standard_normal((64, 96)).astype(np.float16), "w16")]
        make = [helper.make_node("Cast", ["w16"], ["w"], to=TensorProto.FLOAT, name="w/Cast")]
    else:
        inits = [numpy_helper.from_array(rng.integers(-100, 100, (64, 96)).astype(np.int8), "wq"),
                 numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
                 numpy_helper.from_array(np.array(0, np.int8), "zero")]
        make = [helper.make_node("DequantizeLinear", ["wq", "scale", "zero"], ["w"], name="w/Dequantize")]
    graph = helper.make_graph([*make, helper.make_node("MatMul", ["x", "w"], ["y"], name="fc/MatMul")], "computed",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 96])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _bfloat16_weight() -> onnx.ModelProto:
    from onnx import TensorProto, helper

    weight = helper.make_tensor("w", TensorProto.BFLOAT16, [64, 96], vals=np.zeros(64 * 96, np.uint16).tobytes(),
                                raw=True)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"], name="fc/MatMul")], "bf16",
                              [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["batch", 64])],
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["batch", 96])], [weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("make, reason", [
    (lambda: _computed_weight("Cast"), "weight is computed (Cast of a constant): not a constant; fold it"),
    (lambda: _computed_weight("DequantizeLinear"), "weight is computed (DequantizeLinear of a constant)"),
    (_bfloat16_weight, "weight dtype bfloat16 is not supported (float16, float32 and float64 are)"),
])
def test_skipped_weights_say_what_they_are(tmp_path, make, reason):
    """Misleading messages: a Cast- or DequantizeLinear-fed weight was "activation × activation"; bfloat16 was
    "not floating point"."""
    import json

    onnx.save(make(), tmp_path / "m.onnx")
    layers = json.loads(_run("inspect", tmp_path / "m.onnx", "--json").stdout)["layers"]
    assert [layer["reason"] for layer in layers if layer["name"] == "fc/MatMul"][0].startswith(reason)


def test_cuts_on_a_model_without_attention_say_so(work):
    """Misleading message: a model without attention was asked for --num-heads."""
    onnx.save(models.matmul_add(), work / "fc.onnx")
    np.savez(work / "x.npz", x=np.random.default_rng(0).standard_normal((400, 64)).astype(np.float32))
    result = _run("build", work / "fc.onnx", "--calib", work / "x.npz", "--heads-keep", "0.5", "-o", work / "o")
    _one_error_line(result, r"fc.onnx has no self-attention block \(Q, K, V and output projections as plain MatMuls\)")


def test_too_few_positions_names_the_fix_that_exists(work):
    """Misleading message: 4 samples of a 64-wide input suggested --calib-samples (which only lowers the count)
    and the attention mask (which this model has not)."""
    onnx.save(models.matmul_add(), work / "fc.onnx")
    np.savez(work / "x4.npz", x=np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32))
    result = _run("build", work / "fc.onnx", "--calib", work / "x4.npz", "--eval", work / "x4.npz",
                  "--plan", "lowrank", "-o", work / "o")
    _one_error_line(result, r"calibration counted 4 positions of 'x', fewer than its width 64, so its statistics "
                            r"cannot be trusted; give a calibration file with more samples \(at least 64 positions")
    assert "--calib-samples" not in result.stderr and "mask" not in result.stderr


def _tied_embedding() -> onnx.ModelProto:
    """GPT-2's tied head: input_ids ─Gather(E)─► h ─MatMul(W)─Add─► h2 ─MatMul(Transpose(E))─► logits."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((256, 64)).astype(np.float32), "E"),
             numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), "W"),
             numpy_helper.from_array(rng.standard_normal(64).astype(np.float32), "b")]
    nodes = [helper.make_node("Gather", ["E", "input_ids"], ["h"], name="embed/Gather"),
             helper.make_node("MatMul", ["h", "W"], ["hw"], name="fc/MatMul"),
             helper.make_node("Add", ["hw", "b"], ["h2"], name="fc/Add"),
             helper.make_node("Transpose", ["E"], ["Et"], perm=[1, 0], name="head/Transpose"),
             helper.make_node("MatMul", ["h2", "Et"], ["logits"], name="head/MatMul")]
    graph = helper.make_graph(nodes, "tied", [helper.make_tensor_value_info("input_ids", TensorProto.INT64,
                                                                            ["batch", "seq"])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", 256])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _reused_weight(in_branches: bool) -> onnx.ModelProto:
    """x ─MatMul(W)─Relu─MatMul(V)─► y and W read a second time: by another MatMul, or inside both branches of an
    If (a merged decoder's form)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array((rng.standard_normal((64, 64)) / 8).astype(np.float32), name) for name in "WV"]
    nodes = [helper.make_node("MatMul", ["x", "W"], ["a"], name="first/MatMul"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "V"], ["y"], name="own/MatMul")]
    if in_branches:
        def branch(tag):
            return helper.make_graph([helper.make_node("MatMul", ["r", "W"], [f"{tag}_out"], name=f"{tag}/MatMul")],
                                     tag, [], [helper.make_tensor_value_info(f"{tag}_out", TensorProto.FLOAT, None)])
        nodes.append(helper.make_node("If", ["flag"], ["again"], then_branch=branch("then"),
                                      else_branch=branch("else"), name="branch/If"))
        inputs = [helper.make_tensor_value_info("flag", TensorProto.BOOL, [])]
    else:
        nodes.append(helper.make_node("MatMul", ["r", "W"], ["again"], name="second/MatMul"))
        inputs = []
    graph = helper.make_graph(nodes, "reused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 64]),
                                                *inputs],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 64]),
                               helper.make_tensor_value_info("again", TensorProto.FLOAT, ["batch", 64])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("make, feed, shared", [
    (_tied_embedding, {"input_ids": np.random.default_rng(2).integers(0, 256, (300, 8))}, ["head/MatMul"]),
    (lambda: _reused_weight(False), {"x": np.random.default_rng(2).standard_normal((300, 64)).astype(np.float32)},
     ["first/MatMul", "second/MatMul"]),
    (lambda: _reused_weight(True), {"x": np.random.default_rng(2).standard_normal((300, 64)).astype(np.float32),
                                    "flag": np.ones((300,), bool)}, ["first/MatMul"]),
], ids=["3 tied embedding", "4 weight of two MatMuls", "5 weight read in If branches"])
def test_a_shared_weight_stays_dense_and_the_model_never_grows(tmp_path, make, feed, shared):
    """3–5: a weight read elsewhere too (a tied embedding's Gather, a second MatMul, an If branch) was split:
    the original stayed for its other readers, the factors came on top (model ×1.36, ×2.43) while the report
    said under half was kept. Such a layer stays dense with the reason; the report's counts are what is stored."""
    import json

    onnx.save(make(), tmp_path / "m.onnx")
    np.savez(tmp_path / "c.npz", **feed)
    result = _run("build", tmp_path / "m.onnx", "--calib", tmp_path / "c.npz", "--plan", "lowrank",
                  "--rank-budget", "0.5", "--rank-multiple", "8", "-o", tmp_path / "o", "--json")
    if "flag" in feed:  # a scalar input: refused before any rewrite (the If's condition has no batch axis)
        _one_error_line(result, r"model input 'flag' is a scalar")
        layers = json.loads(_run("inspect", tmp_path / "m.onnx", "--json").stdout)["layers"]
    else:
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        layers = report["layers"]
        stored = sum(int(np.prod(i.dims)) for i in onnx.load(str(tmp_path / "o" / "m.lowrank.onnx")).graph.initializer)
        assert report["params"]["model_after"] == stored <= report["params"]["model_before"]
    for layer in layers:
        if layer["name"] in shared:
            assert "weight is shared with" in layer["reason"] and "tied or reused" in layer["reason"], layer


def _with_classifier(width: int = 96) -> onnx.ModelProto:
    """The pooled encoder with a classifier on its pooled vector: `embedding` [batch, 64] ─MatMul─► logits, one row
    per sample."""
    from onnx import TensorProto, helper, numpy_helper

    model = models.pooled_encoder()
    weight = (np.random.default_rng(7).standard_normal((64, width)) / 8).astype(np.float32)
    model.graph.initializer.append(numpy_helper.from_array(weight, "cls.weight"))
    model.graph.node.append(helper.make_node("MatMul", ["embedding", "cls.weight"], ["logits"], name="classifier"))
    del model.graph.output[:]
    model.graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width]))
    return model


def test_a_classifier_with_fewer_samples_than_its_width_stays_dense(tmp_path):
    """Issue 26: with fewer calibration samples than a classifier's (or pooler's) width the whole build stopped
    ("calibration counted 52 real positions ..."); now that layer alone stays dense, with the reason."""
    import json

    onnx.save(_with_classifier(), tmp_path / "cls.onnx")
    np.savez(tmp_path / "c.npz", **models.transformer_inputs(40))  # 40 pooled rows, 64 wide; ~400 token rows
    result = _run("build", tmp_path / "cls.onnx", "--calib", tmp_path / "c.npz", "--eval", tmp_path / "c.npz",
                  "--plan", "lowrank", "--rank-budget", "0.5", "-o", tmp_path / "o", "--json")
    assert result.exit_code == 0, result.output
    layers = {layer["name"]: layer for layer in json.loads(result.stdout)["layers"]}
    assert layers["up"]["status"] == "factorized" and layers["down"]["status"] == "factorized"
    assert layers["classifier"]["status"] != "factorized"
    assert "kept dense: calibration counted 40 positions of its input, fewer than its width 64" in \
        layers["classifier"]["reason"]
    assert "classifier: kept dense" in " ".join(result.stderr.split())
