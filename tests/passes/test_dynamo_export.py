"""Structured cuts on a BERT exported by torch's dynamo exporter (opset 18, weights in external data, node names
like `node_MatMul_95`, a recorded shape for every intermediate tensor, head reshapes built by Concat with -1).

Each model is a tiny random BERT with parts silenced in PyTorch before export, so that the cut is exact: one
head's rows of W_o zeroed in every block, half the FFN neurons zeroed (GELU(0) = 0), or one block's residual
branches zeroed (its LayerNorms then re-normalise an already normalised stream)."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("transformers")
pytest.importorskip("onnxscript")  # torch's dynamo exporter writes through it

from lrdeploy.cli import main  # noqa: E402
from tests.conftest import run_model  # noqa: E402

HEADS, HEAD_DIM, FFN = 4, 16, 128


def _silence_head(layer, head: int) -> None:
    layer.attention.output.dense.weight[:, head * HEAD_DIM:(head + 1) * HEAD_DIM] = 0


def _silence_neurons(layer, neurons: slice) -> None:
    layer.intermediate.dense.weight[neurons] = 0
    layer.intermediate.dense.bias[neurons] = 0


def _silence_block(layer) -> None:
    for linear in (layer.attention.output.dense, layer.output.dense):
        linear.weight.zero_()
        linear.bias.zero_()


def _dynamo_export(folder: Path, path: Path, silence) -> Path:
    """Tiny BERT (2 blocks, hidden 64, 4 heads, FFN 128) with `silence(blocks)` applied, mean-pooled, exported
    by the dynamo exporter with dynamic batch and sequence into `path` + external data."""
    import torch

    from lrdeploy.export.torch_onnx import sentence_embedder
    from tests.factories import tiny_bert_dir

    module, inputs = sentence_embedder(tiny_bert_dir(folder), "mean", True)
    with torch.no_grad():
        silence(module.encoder.encoder.layer)
        dims = {name: {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")} for name in inputs}
        program = torch.onnx.export(module.eval(), (), kwargs=dict(inputs), dynamo=True, opset_version=18,
                                    input_names=list(inputs), output_names=["sentence"], dynamic_shapes=dims)
    program.save(str(path), external_data=True)
    return path


def _feeds(count: int = 64, seq: int = 16, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, 3000, size=(count, seq)).astype(np.int64)
    mask = (np.arange(seq)[None, :] < rng.integers(4, seq + 1, size=(count, 1))).astype(np.int64)
    return {"input_ids": ids, "attention_mask": mask}


def _build(model: Path, tmp_path: Path, *options: str) -> tuple[onnx.ModelProto, dict]:
    import json

    np.savez(tmp_path / "calib.npz", **_feeds())
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(tmp_path / "calib.npz"), *options,
                                       "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return onnx.load(str(out / f"{model.stem}.lowrank.onnx")), json.loads(result.stdout)


def _assert_same_outputs(original: Path, cut: onnx.ModelProto) -> None:
    feeds = _feeds(48, seed=1)
    want, got = run_model(onnx.load(str(original)), feeds)[0], run_model(cut, feeds)[0]
    np.testing.assert_allclose(got, want, atol=2e-5)


def test_dynamo_export_is_what_these_tests_claim(tmp_path):
    model = onnx.load(str(_dynamo_export(tmp_path / "bert", tmp_path / "m.onnx", lambda blocks: None)),
                      load_external_data=False)
    assert model.opset_import[0].version == 18 and (tmp_path / "m.onnx.data").stat().st_size > 0
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in model.graph.initializer)
    assert len(model.graph.value_info) > 50 and any(n.name.startswith("node_MatMul") for n in model.graph.node)


def test_silent_heads_are_removed_exactly(tmp_path):
    def silence(blocks):
        _silence_head(blocks[0], 2)
        _silence_head(blocks[1], 0)

    model = _dynamo_export(tmp_path / "bert", tmp_path / "m.onnx", silence)
    cut, report = _build(model, tmp_path, "--heads-keep", "0.75", "--rank-budget", "1")
    narrowed = [layer for layer in report["layers"] if layer["status"] == "narrowed"]
    assert len(narrowed) == 8 and all("3 of 4 heads" in layer["reason"] for layer in narrowed), narrowed
    _assert_same_outputs(model, cut)


def test_values_of_low_rank_are_narrowed_exactly(tmp_path):
    """`--values-keep 0.25`: each head's value weight has rank 4 of 16 (its bias stays: it folds into O's), so the
    narrower V/O pair is exact, with the head size of V's reshape rewritten as the dynamo export spells it."""
    def low_rank_values(blocks):
        for block in blocks:
            weight = block.attention.self.value.weight  # [out, in]: each head's HEAD_DIM rows
            for head in range(HEADS):
                weight[head * HEAD_DIM + 4:(head + 1) * HEAD_DIM] = 0  # 4 of its 16 value features vary

    model = _dynamo_export(tmp_path / "bert", tmp_path / "m.onnx", low_rank_values)
    cut, report = _build(model, tmp_path, "--values-keep", "0.25", "--rank-budget", "1")
    narrowed = [layer for layer in report["layers"] if layer["status"] == "narrowed"]
    assert len(narrowed) == 4 and all(layer["reason"].startswith("value heads 4 of 16 wide") for layer in narrowed)
    _assert_same_outputs(model, cut)


def test_silent_ffn_neurons_are_removed_exactly(tmp_path):
    kept = FFN // 4
    model = _dynamo_export(tmp_path / "bert", tmp_path / "m.onnx",
                           lambda blocks: [_silence_neurons(block, slice(kept, FFN)) for block in blocks])
    cut, report = _build(model, tmp_path, "--ffn-keep", "0.25", "--rank-budget", "1")
    narrowed = sorted(tuple(i.dims) for i in cut.graph.initializer if len(i.dims) == 2 and kept in i.dims)
    assert narrowed == [(kept, 64), (kept, 64), (64, kept), (64, kept)]
    _assert_same_outputs(model, cut)


def test_a_silent_block_is_dropped_exactly(tmp_path):
    model = _dynamo_export(tmp_path / "bert", tmp_path / "m.onnx", lambda blocks: _silence_block(blocks[1]))
    cut, report = _build(model, tmp_path, "--drop-blocks", "1", "--rank-budget", "1")
    assert sum(layer["status"] == "dropped" for layer in report["layers"]) == 6
    assert sum(node.op_type == "MatMul" for node in cut.graph.node) == 8  # block 0: 6 linear + 2 attention
    _assert_same_outputs(model, cut)


def test_unified_plan_splits_and_cuts_the_dynamo_export(tmp_path):
    model = _dynamo_export(tmp_path / "bert", tmp_path / "m.onnx",
                           lambda blocks: [_silence_neurons(block, slice(FFN // 4, FFN)) for block in blocks])
    cut, report = _build(model, tmp_path, "--plan", "unified", "--rank-budget", "0.5")
    assert report["latency_plan"]["plan"] == "unified"
    assert report["accuracy"]["outputs"]["sentence"]["cosine_mean"] > 0.99
    assert (tmp_path / "m.onnx.data").stat().st_size > 0  # the input's external data is untouched
