"""Narrower value heads (`passes/shrink_values`): exact when each head's W_v·W_o has rank ≤ r (the value bias
folded into the output bias), gradual otherwise, on the hand-built graph and on torch's export (Concat shapes)."""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import numpy_helper

from lrdeploy.calib.stats import TensorRequest, collect_moments
from lrdeploy.lowrank.moments import Moments
from lrdeploy.lowrank.value_heads import shrink_value_heads
from lrdeploy.passes.linear_layers import find_linear_layers
from lrdeploy.passes.prune_heads import find_attention_blocks
from lrdeploy.passes.shrink_values import shrink_values
from tests import models
from tests.conftest import built_cut, run_model

INPUTS = models.transformer_inputs(48)


def _low_rank_values(model, rank, head_dim=16, heads=4):
    """`model` with each head's value weight of rank `rank` (its bias left full: it folds into b_o exactly)."""
    rng = np.random.default_rng(5)
    for init in model.graph.initializer:
        if init.name.endswith("/attention/value.weight"):
            weight = numpy_helper.to_array(init).copy()
            for head in range(heads):
                columns = slice(head * head_dim, (head + 1) * head_dim)
                weight[:, columns] = weight[:, columns] @ _projector(rng, head_dim, rank)
            init.CopyFrom(numpy_helper.from_array(weight.astype(np.float32), init.name))
    return model


def _projector(rng, size, rank):
    basis, _ = np.linalg.qr(rng.standard_normal((size, rank)))
    return basis @ basis.T


def _shrunk(model, rank, heads=4):
    graph = gs.import_onnx(model)
    blocks = find_attention_blocks(find_linear_layers(graph), heads=heads)
    moments = collect_moments(model, [TensorRequest(b.output.input_name, b.width) for b in blocks],
                              lambda: [INPUTS], "attention_mask", threads=1)
    cuts = []
    for block in blocks:
        value = block.projections[-1]
        cut = shrink_value_heads(moments[block.output.input_name], value.weight, value.bias, block.output.weight,
                                 block.output.bias, block.heads, rank)
        shrink_values(graph, block, cut)
        cuts.append(cut)
    shrunk = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(shrunk)
    return shrunk, cuts


def test_values_of_rank_r_are_shrunk_exactly():
    model = _low_rank_values(models.transformer(layers=2), rank=6)
    shrunk, cuts = _shrunk(model, 6)
    assert [c.lost_energy for c in cuts] == pytest.approx([0.0, 0.0], abs=1e-5)  # the ridge's share only
    shapes = {i.name: tuple(i.dims) for i in shrunk.graph.initializer}
    assert shapes["layer0/attention/output/MatMul/values/value/weight"] == (64, 24)  # 4 heads × 6
    assert shapes["layer0/attention/output/MatMul/values/output/weight"] == (24, 64)
    split = {i.name: numpy_helper.to_array(i).tolist() for i in shrunk.graph.initializer if i.name.endswith("/shape")}
    assert split["layer0/attention/output/MatMul/values/value/shape"] == [0, 0, 4, 6]  # Q and K keep [0, 0, 4, 16]
    assert split["layer0/attention/output/MatMul/values/context/shape"] == [0, 0, 24]
    for want, got in zip(run_model(model, INPUTS), run_model(shrunk, INPUTS)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_narrower_values_cost_accuracy_gradually():
    model = models.transformer(layers=2)
    reference = run_model(model, INPUTS)[1]
    cosines, lost = [], []
    for rank in (16, 8, 2):
        shrunk, cuts = _shrunk(model, rank)
        output = run_model(shrunk, INPUTS)[1]
        cosines.append(float(np.mean((reference * output).sum(1) / np.linalg.norm(reference, axis=1)
                                     / np.linalg.norm(output, axis=1))))
        lost.append(cuts[0].lost_energy)
    assert cosines[0] == pytest.approx(1.0, abs=1e-6) and cosines[0] > cosines[1] > cosines[2] > 0.5
    assert lost[0] == pytest.approx(0.0, abs=1e-5) and 1e-3 < lost[1] < lost[2] < 1


def test_a_rank_above_the_head_size_is_refused():
    weight = np.ones((8, 8))
    moments = Moments.zeros(8).add(1, np.ones(8), np.eye(8))
    with pytest.raises(ValueError, match="rank 5 is outside 1..4 \\(the head size\\)"):
        shrink_value_heads(moments, weight, None, weight, None, 2, 5)


def test_torch_export_with_concatenated_shapes_is_shrunk_exactly(tmp_path):
    """torch's exporter spells V's target shape as Concat(batch, seq, [-1], [head size]): the head-size piece is
    rewritten for V alone (Q and K keep theirs), and values of rank ≤ r are shrunk exactly."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import BertModel

    from lrdeploy.export.torch_onnx import export_hf
    from tests.factories import tiny_bert_dir

    folder = tiny_bert_dir(tmp_path / "hf")
    bert = BertModel.from_pretrained(str(folder))
    rng = np.random.default_rng(7)
    with torch.no_grad():
        for layer in bert.encoder.layer:
            weight = layer.attention.self.value.weight.numpy()  # [out, in]: each head's 16 rows
            for head in range(4):
                weight[head * 16:(head + 1) * 16] = _projector(rng, 16, 6) @ weight[head * 16:(head + 1) * 16]
    bert.save_pretrained(str(folder))
    export_hf(folder, tmp_path / "bert.onnx", "mean", True)
    model = onnx.load(str(tmp_path / "bert.onnx"))
    rng = np.random.default_rng(0)
    mask = (np.arange(12)[None, :] < rng.integers(3, 13, size=8)[:, None]).astype(np.int64)
    feed = {"input_ids": rng.integers(1, 3000, size=(8, 12)) * mask, "attention_mask": mask}
    graph = gs.import_onnx(model)
    blocks = find_attention_blocks(find_linear_layers(graph), heads=4)
    moments = collect_moments(model, [TensorRequest(b.output.input_name, b.width) for b in blocks],
                              lambda: [feed], "attention_mask", threads=1)
    for block in blocks:
        value = block.projections[-1]
        shrink_values(graph, block, shrink_value_heads(moments[block.output.input_name], value.weight, value.bias,
                                                       block.output.weight, block.output.bias, 4, 6))
    shrunk = gs.export_onnx(graph.cleanup().toposort())
    assert len(blocks) == 2 and sum(n.op_type == "Concat" and n.name.endswith("value/shape/concat")
                                    for n in shrunk.graph.node) == 2
    np.testing.assert_allclose(run_model(shrunk, feed)[0], run_model(model, feed)[0], rtol=1e-4, atol=1e-4)


def test_build_narrows_value_heads_and_splits_the_rest(transformer_files, tmp_path):
    """`build --values-keep 0.5`: V and O of every block narrowed to 8 of 16 per head (reported with the energy
    left out), Q, K and the FFN split under --rank-budget, and the option refused where it cannot apply."""
    from click.testing import CliRunner

    from lrdeploy.cli import main

    model, calib = transformer_files
    out = tmp_path / "out"
    report, narrowed = built_cut(model, calib, out, "--values-keep", "0.5", "--rank-budget", "0.7",
                                 "--allocation", "uniform")
    assert sorted(narrowed) == sorted(f"layer{i}/attention/{p}/MatMul" for i in range(2) for p in ("value", "output"))
    value = narrowed["layer0/attention/value/MatMul"]
    assert value["reason"].startswith("value heads 8 of 16 wide (--values-keep; ") and value["params_after"] == 64 * 32
    assert narrowed["layer0/attention/output/MatMul"]["params_after"] == 32 * 64
    split = {l["name"] for l in report["layers"] if l["status"] == "factorized"}
    assert "layer0/attention/query/MatMul" in split and not split & set(narrowed)
    assert report["config"]["values_keep"] == 0.5
    meta = {p.key: p.value for p in onnx.load(str(out / "tiny.lowrank.onnx")).metadata_props}
    assert meta["lrdeploy.values_keep"] == "0.5"
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.5
    for options, message in ((["--optimize", "ort"], "--values-keep cannot be combined with --optimize ort"),
                             (["--heads-keep", "0.5"], "--values-keep cannot be combined with --heads-keep"),
                             (["--target-latency", "0.7"], "--values-keep cannot be combined with --target-latency")):
        refused = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--values-keep", "0.5",
                                            *options, "-o", str(tmp_path / "refused")])
        assert refused.exit_code == 1 and message in refused.output and "Traceback" not in refused.output
