"""The CLI end to end on tiny models (click's CliRunner): outputs, reports, and every bad input."""

import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from lrdeploy.cli import main
from tests import models
from tests.conftest import run_model

REPORT_KEYS = {"lrdeploy_version", "input_model", "output_model", "config", "layers", "params", "accuracy", "timings"}


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_inspect_table_and_json(transformer_files):
    model, _ = transformer_files
    table = _invoke("inspect", model)
    assert table.exit_code == 0
    assert "12 eligible" in table.output and "MatMul+Add" in table.output and "skipped: weight" in table.output
    data = json.loads(_invoke("inspect", model, "--json").output)
    initializers = onnx.load(str(model)).graph.initializer
    assert data["totals"] == {"layers": 16, "eligible": 12, "eligible_params": 8 * 64 * 64 + 4 * 64 * 256,
                              "model_params": sum(int(np.prod(i.dims)) for i in initializers), "in_branches": 0}
    skipped = [l for l in data["layers"] if not l["eligible"]]
    assert {l["reason"] for l in skipped} == {"weight is not constant (activation × activation)"}
    assert data["blocks"] == {"ffn": 2, "attention": 2, "droppable": 2, "refused": []}
    assert "Blocks: 2 self-attentions (--heads-keep), 2 FFNs (--ffn-keep), 2 blocks that can be dropped" in " ".join(
        table.output.split())


def test_inspect_says_why_a_block_is_not_taken(tmp_path):
    """A KV-cache model's blocks write its `present` outputs: none can become the identity, and inspect says so."""
    pytest.importorskip("transformers")
    from lrdeploy.export.torch_onnx import export_hf
    from tests.factories import tiny_llama_dir

    model = tmp_path / "lm.onnx"
    export_hf(tiny_llama_dir(tmp_path / "hf"), model, task="text-generation-with-past")
    data = json.loads(_invoke("inspect", model, "--json").output)
    assert data["blocks"]["attention"] == 2 and data["blocks"]["droppable"] == 0
    assert [(r["part"], r["candidate"]) for r in data["blocks"]["refused"]] == [("block", "block0"), ("block", "block1")]
    assert all("the graph's outputs" in r["reason"] for r in data["blocks"]["refused"])
    table = _invoke("inspect", model)
    assert "not taken as a droppable block: block0: " in " ".join(table.output.split())


def test_the_default_plan_is_unified_unless_an_option_asks_for_low_rank(transformer_files, tmp_path):
    """`--plan auto`: the unified plan (the most accurate per parameter and per latency measured), but the
    low-rank plan where the options are low-rank's own (a chosen --allocation here)."""
    model, calib = transformer_files
    auto = json.loads(_invoke("build", model, "--calib", calib, "--rank-budget", "0.5", "-o", tmp_path / "a",
                              "--json").stdout)
    assert auto["latency_plan"]["plan"] == "unified" and auto["params"]["linear_ratio"] <= 0.5
    chosen = json.loads(_invoke("build", model, "--calib", calib, "--rank-budget", "0.5", "--allocation", "energy",
                                "-o", tmp_path / "b", "--json").stdout)
    assert chosen["latency_plan"] is None and chosen["config"]["allocation"] == "energy"
    low_rank = json.loads(_invoke("build", model, "--calib", calib, "--rank-budget", "0.5", "--plan", "lowrank",
                                  "-o", tmp_path / "c", "--json").stdout)
    assert auto["accuracy"]["outputs"]["embedding"]["cosine_mean"] > low_rank["accuracy"]["outputs"]["embedding"][
        "cosine_mean"]


@pytest.mark.parametrize("budget", [0.4, 0.7])
def test_build_writes_model_and_reports(transformer_files, tmp_path, budget):
    model, calib = transformer_files
    before = _digest(model)
    out = tmp_path / "out"
    result = _invoke("build", model, "--rank-budget", budget, "--calib", calib, "--plan", "lowrank", "-o", out)
    assert result.exit_code == 0, result.output
    assert _digest(model) == before
    compressed = out / "tiny.lowrank.onnx"
    onnx.checker.check_model(str(compressed))
    report = json.loads((out / "report.json").read_text())
    assert REPORT_KEYS <= set(report)
    peaks = list(report["peak_rss_mb"].values())  # the process's peak so far at each stage's end: never falls
    assert list(report["peak_rss_mb"]) == list(report["timings"]) and peaks == sorted(peaks) and peaks[0] > 10
    assert "peak RSS (MB)" in (out / "report.md").read_text() and ", peak " in result.output
    assert report["config"] == {"rank_budget": budget, "method": "pca", "allocation": "uniform", "rank_multiple": 16,
                                "calib_samples": 77, "calib_source": f"calibration file {calib}",
                                "eval_source": "held-out tail of calibration file " + str(calib) + " (19 samples)",
                                "refit": False, "optimize": "none", "ffn_keep": None, "heads_keep": None, "drop_blocks": 0,
                                "qkv": "separate", "values_keep": None}
    assert report["params"]["linear_ratio"] <= budget
    assert report["params"]["model_after"] < report["params"]["model_before"]
    assert report["accuracy"]["samples"] == 19
    embedding = report["accuracy"]["outputs"]["embedding"]
    assert 0.5 < embedding["cosine_p5"] <= embedding["cosine_mean"] < 1.0
    factorized = [l for l in report["layers"] if l["status"] == "factorized"]
    assert factorized and all(l["rank"] % 16 == 0 and l["params_after"] == l["rank"] * (l["d_in"] + l["d_out"])
                              for l in factorized)
    props = {p.key: p.value for p in onnx.load(str(compressed)).metadata_props}
    assert props["lrdeploy.method"] == "pca" and float(props["lrdeploy.rank_budget"]) == budget
    assert json.loads(props["lrdeploy.ranks"]) == {l["name"]: l["rank"] for l in report["layers"] if l["status"] != "skipped"}
    assert "| layer | pattern |" in (out / "report.md").read_text()
    feeds = models.transformer_inputs(4)
    assert [o.shape for o in run_model(compressed, feeds)] == [o.shape for o in run_model(model, feeds)]


def test_second_build_reuses_calibration_statistics(transformer_files, tmp_path):
    model, calib = transformer_files
    first = _invoke("build", model, "--calib", calib, "-o", tmp_path / "a", "--rank-budget", "0.5")
    second = _invoke("build", model, "--calib", calib, "-o", tmp_path / "b", "--rank-budget", "0.4", "--method", "whiten")
    assert "statistics from cache" not in first.output
    assert "statistics from cache" in second.output


def test_random_calibration_warns(transformer_files, tmp_path):
    model, _ = transformer_files
    result = _invoke("build", model, "--shape", "input_ids:1x16", "--shape", "attention_mask:1x16",
                     "--calib-samples", "64", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert "Warning: calibrating on random data: the factors will be poor" in result.output


def test_json_output_and_energy_allocation(transformer_files, tmp_path):
    model, calib = transformer_files
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "-o", str(tmp_path / "o"),
                                       "--allocation", "energy", "--json"])
    assert result.exit_code == 0
    report = json.loads(result.stdout)
    assert report["config"]["allocation"] == "energy" and report["params"]["linear_ratio"] <= 0.5


def test_external_data_model_round_trip(tmp_path):
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    onnx.save_model(models.transformer(), str(model_dir / "tiny.onnx"), save_as_external_data=True,
                    location="tiny.onnx.data", size_threshold=1024)
    np.savez(tmp_path / "c.npz", **models.transformer_inputs(64))
    result = _invoke("build", model_dir / "tiny.onnx", "--calib", tmp_path / "c.npz", "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    data = tmp_path / "out" / "tiny.lowrank.onnx.data"
    assert data.is_file() and data.stat().st_mode & 0o777 == (tmp_path / "out" / "tiny.lowrank.onnx").stat().st_mode & 0o777
    assert json.loads((tmp_path / "out" / "report.json").read_text())["external_data"] is True
    feeds = models.transformer_inputs(3)
    run_model(tmp_path / "out" / "tiny.lowrank.onnx", feeds)


def _write_bad_inputs(tmp_path):
    """The files the bad-input cases name, written beside the tiny model."""
    (tmp_path / "notes.onnx").write_text("hello")
    onnx.save(models.activation_matmul(), tmp_path / "act.onnx")
    arrays = models.transformer_inputs(20)
    np.savez(tmp_path / "missing.npz", input_ids=arrays["input_ids"])
    np.savez(tmp_path / "dtype.npz", input_ids=arrays["input_ids"].astype(np.float32), attention_mask=arrays["attention_mask"])
    np.savez(tmp_path / "shape.npz", input_ids=arrays["input_ids"][:, :, None], attention_mask=arrays["attention_mask"])
    np.savez(tmp_path / "pickled.npz", input_ids=np.array([None, 1], dtype=object), attention_mask=arrays["attention_mask"])
    (tmp_path / "a_file").write_text("x")


# (case, arguments with {dir} = the model's folder, {model}, {calib}; expected message regex)
BAD_INPUTS = [
    ("missing model", ["build", "{dir}/nope.onnx", "--calib", "{calib}"], r"model file .*nope.onnx does not exist; check the path"),
    ("not onnx", ["build", "{dir}/notes.onnx", "--calib", "{calib}"], r"notes.onnx is not a valid ONNX model \(\w+\); pass a .onnx file"),
    ("no eligible layer", ["build", "{dir}/act.onnx"], r"has no linear layer to compress \(1 MatMul/Gemm found, all skipped: weight is not constant"),
    ("budget zero", ["build", "{model}", "--rank-budget", "0", "--calib", "{calib}"], r"rank budget 0.0 is outside \(0, 1\]; pass e.g. --rank-budget 0.5"),
    ("budget above one", ["build", "{model}", "--rank-budget", "1.5", "--calib", "{calib}"], r"rank budget 1.5 is outside \(0, 1\]"),
    ("budget too small", ["build", "{model}", "--rank-budget", "0.1", "--calib", "{calib}"], r"rank budget 0.1 is below what the smallest rank \(16\) keeps \(0.375\); raise --rank-budget to at least 0.375 or lower --rank-multiple"),
    ("calib missing input", ["build", "{model}", "--calib", "{dir}/missing.npz"], r"has no array for model input 'attention_mask'"),
    ("calib wrong dtype", ["build", "{model}", "--calib", "{dir}/dtype.npz"], r"input 'input_ids' is float32 but the model expects int64"),
    ("calib wrong shape", ["build", "{model}", "--calib", "{dir}/shape.npz"], r"input 'input_ids' has shape 20x16x1 but the model expects \?x\?"),
    ("pickled npz", ["build", "{model}", "--calib", "{dir}/pickled.npz"], r"holds pickled \(object\) arrays"),
    ("missing calib", ["build", "{model}", "--calib", "{dir}/nope.npz"], r"calibration file .*nope.npz does not exist"),
    ("unwritable output", ["build", "{model}", "--calib", "{calib}", "-o", "{dir}/a_file/sub"], r"cannot write to output directory .*a_file/sub \(.+\); choose another with -o/--output-dir"),
    ("bad shape option", ["build", "{model}", "--shape", "input_ids:1xa"], r"--shape 'input_ids:1xa' is not NAME:DIMS; write it like input_ids:1x128"),
    ("unknown mask input", ["build", "{model}", "--calib", "{calib}", "--mask-input", "nope"], r"--mask-input 'nope' is not a model input \(input_ids, attention_mask\)"),
    ("sweep bad target metric", ["sweep", "{model}", "--calib", "{calib}", "--target-metric", "accuracy=0.9"], r"--target-metric 'accuracy=0.9' is not NAME=VALUE"),
    ("sweep unknown output", ["sweep", "{model}", "--calib", "{calib}", "--budgets", "0.5", "--output", "nope", "--bench-batch", "0"], r"--output 'nope' is not a model output \(last_hidden_state, embedding\); pass one of those"),
    ("demo too many sentences", ["demo", "-o", "{dir}/demo", "--calib-sentences", "100000"], r"100000 calibration \+ 1000 evaluation sentences were asked for but pydoc has only \d+; lower --calib-sentences or --eval-sentences"),
    ("demo budget above one", ["demo", "-o", "{dir}/demo", "--rank-budget", "2"], r"rank budget 2.0 is outside \(0, 1\]"),
    ("bench engine file", ["bench", "{dir}/m.engine"], r"m.engine is a TensorRT engine, which does not say its inputs; bench the ONNX file"),
]


@pytest.mark.parametrize("args, message", [case[1:] for case in BAD_INPUTS], ids=[case[0] for case in BAD_INPUTS])
def test_bad_input_gives_one_error_line_and_leaves_no_output(transformer_files, tmp_path, args, message):
    import re

    model, calib = transformer_files
    _write_bad_inputs(tmp_path)
    (tmp_path / "m.engine").write_bytes(b"engine")
    before = {p: _digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    result = CliRunner().invoke(main, [a.format(dir=tmp_path, model=model, calib=calib) for a in args])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)  # no traceback
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert re.search(message, lines[0]), lines[0]
    assert {p: _digest(p) for p in tmp_path.rglob("*") if p.is_file()} == before  # inputs untouched, nothing written


def test_layers_inside_if_branches_are_named_not_ignored(tmp_path):
    """A merged decoder (Optimum's decoder_model_merged.onnx) keeps its layers in the branches of an If: `inspect`
    counts them and `build` says what to build instead, in one line."""
    from onnx import TensorProto, helper

    def branch(name):
        weight = helper.make_tensor(f"{name}_w", TensorProto.FLOAT, [8, 8], np.ones(64, np.float32))
        return helper.make_graph([helper.make_node("MatMul", ["x", f"{name}_w"], [f"{name}_y"])], name, [],
                                 [helper.make_tensor_value_info(f"{name}_y", TensorProto.FLOAT, [2, 8])], [weight])

    graph = helper.make_graph(
        [helper.make_node("If", ["use_cache_branch"], ["y"], then_branch=branch("then"), else_branch=branch("else"))],
        "merged", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8]),
                   helper.make_tensor_value_info("use_cache_branch", TensorProto.BOOL, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])])
    model = tmp_path / "decoder_model_merged.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), model)
    assert json.loads(_invoke("inspect", model, "--json").output)["totals"]["in_branches"] == 2
    result = _invoke("build", model, "-o", str(tmp_path / "o"))
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "keeps its 2 MatMul/Gemm inside the branches of an If (a merged decoder" in result.output
