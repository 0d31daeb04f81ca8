"""`--optimize ort`: compression inside ONNX Runtime's fused graph keeps every fusion, is exact at full rank,
and calibration, sensitivity, refit and bench work on it (a tiny random BERT exported like MiniLM)."""

import json

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from lrdeploy.calib.data import Feeds, SampleSet, model_input_specs  # noqa: E402
from lrdeploy.calib.stats import TensorRequest, collect_moments  # noqa: E402
from lrdeploy.cli import main  # noqa: E402
from lrdeploy.lowrank.decompose import decompose  # noqa: E402
from lrdeploy.passes.factorize import factorized_model  # noqa: E402
from lrdeploy.passes.inject_error import error_injected_model  # noqa: E402
from lrdeploy.passes.linear_layers import find_linear_layers  # noqa: E402
from lrdeploy.passes.ort_fusion import attention_geometry, fuse_for_onnxruntime, fused_op_counts  # noqa: E402
from tests import models  # noqa: E402
from tests.conftest import run_model  # noqa: E402
from tests.factories import tiny_bert_dir  # noqa: E402

FUSED = {"Attention": 2, "BiasGelu": 2, "EmbedLayerNormalization": 1, "SkipLayerNormalization": 4}


def _inputs(count, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, seq + 1, size=count)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int64)
    return {"input_ids": rng.integers(1, 3000, size=(count, seq)) * mask, "attention_mask": mask}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from lrdeploy.export.torch_onnx import export_hf

    folder = tmp_path_factory.mktemp("bert")
    export_hf(tiny_bert_dir(folder / "hf"), folder / "bert.onnx", "mean", True)
    np.savez(folder / "calib.npz", **_inputs(96))
    return folder


@pytest.fixture(scope="module")
def fused(exported):
    model = onnx.load(str(exported / "bert.onnx"))
    return model, fuse_for_onnxruntime(model)


def test_geometry_is_read_from_the_graph_and_the_fusions_happen(fused):
    model, fused_model = fused
    assert attention_geometry(gs.import_onnx(model)) == (4, 64)
    assert fused_op_counts(model) == {} and fused_op_counts(fused_model) == FUSED


def test_full_rank_split_inside_the_fused_graph_is_exact(fused):
    model, fused_model = fused
    layers = [l for l in find_linear_layers(gs.import_onnx(fused_model)) if l.eligible]
    assert sorted({l.pattern for l in layers}) == ["Attention", "MatMul+BiasGelu", "MatMul+SkipLayerNormalization"]
    inputs = _inputs(16, seed=1)
    feeds = Feeds(model_input_specs(fused_model), 16, "attention_mask")
    moments = collect_moments(fused_model, [TensorRequest(l.input_name, l.d_in) for l in layers],
                              lambda: feeds.batches(SampleSet(inputs)), "attention_mask", threads=1)
    factors = {l.name: decompose("pca", l.weight, l.bias, moments[l.input_name]).factors(min(l.d_in, l.d_out))
               for l in layers}
    compressed = factorized_model(fused_model, layers, factors)
    assert fused_op_counts(compressed) == FUSED
    attention = next(n for n in compressed.graph.node if n.op_type == "Attention")
    assert attention.input[0].endswith("/lowrank_a/output")  # Attention reads the thin tensor X·A
    for want, got in zip(run_model(model, inputs), run_model(compressed, inputs)):
        np.testing.assert_allclose(got, want, atol=2e-5)


def test_injected_error_on_attention_equals_cutting_it(fused):
    _, fused_model = fused
    layers = [l for l in find_linear_layers(gs.import_onnx(fused_model)) if l.eligible]
    attention = next(l for l in layers if l.pattern == "Attention")
    inputs = _inputs(8, seed=2)
    feeds = Feeds(model_input_specs(fused_model), 8, "attention_mask")
    moments = collect_moments(fused_model, [TensorRequest(attention.input_name, attention.d_in)],
                              lambda: feeds.batches(SampleSet(inputs)), "attention_mask", threads=1)
    factors = decompose("pca", attention.weight, attention.bias, moments[attention.input_name]).factors(16)
    injected, (error,) = error_injected_model(fused_model, [attention])
    delta = {error.weight: (factors.dense_weight() - attention.weight).astype(np.float32),
             error.bias: (factors.bias - attention.bias).astype(np.float32)}
    split = factorized_model(fused_model, layers, {attention.name: factors})
    for want, got in zip(run_model(split, inputs), run_model(injected, {**inputs, **delta})):
        np.testing.assert_allclose(got, want, atol=1e-4)


@pytest.mark.parametrize("extra", [[], ["--allocation", "sensitivity"], ["--refit"]])
def test_build_keeps_every_fusion(exported, tmp_path, extra):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(exported / "bert.onnx"), "--calib", str(exported / "calib.npz"),
                                       "--optimize", "ort", "--rank-budget", "0.5", "--plan", "lowrank", "-o", str(out),
                                       "--json", *extra])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fused_ops"] == {"dense": FUSED, "compressed": FUSED} and report["config"]["optimize"] == "ort"
    assert report["params"]["linear_ratio"] <= 0.5
    assert {l["pattern"] for l in report["layers"] if l["status"] == "factorized"} >= {"Attention"}
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.8
    assert fused_op_counts(onnx.load(str(out / "bert.lowrank.onnx"))) == FUSED


def test_bench_optimize_ort_reports_fused_ops(exported, tmp_path):
    result = CliRunner().invoke(main, ["bench", str(exported / "bert.onnx"), "--optimize", "ort", "--batch", "2",
                                       "--seq", "8", "--iterations", "2", "--threads", "1", "-o", str(tmp_path)])
    assert result.exit_code == 0, result.output
    bench = json.loads((tmp_path / "bench.json").read_text())
    assert bench["optimize"] == "ort" and bench["fused_ops"] == {"bert.onnx": FUSED}
    assert "as ONNX Runtime's transformer optimizer fuses it" in (tmp_path / "bench.md").read_text()


def _fused_cut_build(exported, out, *cut):
    """`build --optimize ort` with the structured option `cut` (no split): its report and narrowed layers, after
    checking that every fusion of the dense model is kept."""
    result = CliRunner().invoke(main, ["build", str(exported / "bert.onnx"), "--calib", str(exported / "calib.npz"),
                                       "--optimize", "ort", *cut, "--rank-budget", "1", "-o", str(out), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fused_ops"] == {"dense": FUSED, "compressed": FUSED}
    return report, [layer for layer in report["layers"] if layer["status"] == "narrowed"]


def test_ffn_width_cut_inside_the_fused_graph_keeps_every_fusion(exported, tmp_path):
    out = tmp_path / "out"
    report, narrowed = _fused_cut_build(exported, out, "--ffn-keep", "0.5")
    assert sorted({l["pattern"] for l in narrowed}) == ["MatMul+BiasGelu", "MatMul+SkipLayerNormalization"]
    assert all(l["reason"] == "64 of 128 FFN neurons kept (--ffn-keep)" for l in narrowed)
    gelu = next(n for n in onnx.load(str(out / "bert.lowrank.onnx")).graph.node if n.op_type == "BiasGelu")
    assert gelu.input[1].endswith("/pruned/bias")  # the fused op carries the sliced up-projection bias
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.9


def _attention_cuts(model, blocks, keep):
    """Each block's heads kept and W_o refit (`keep` of 4), from the contexts' moments on the tiny calibration."""
    from lrdeploy.lowrank.neurons import cut_groups

    feeds = Feeds(model_input_specs(model), 16, "attention_mask")
    moments = collect_moments(model, [TensorRequest(b.output.input_name, b.width) for b in blocks],
                              lambda: feeds.batches(SampleSet(_inputs(64, seed=2))), "attention_mask", threads=1)
    return [cut_groups(moments[b.output.input_name], b.output.weight, b.output.bias, b.heads, keep) for b in blocks]


def _rewritten(model, edit):
    graph = gs.import_onnx(model)
    edit(graph)
    rewritten = gs.export_onnx(graph.cleanup().toposort())
    onnx.checker.check_model(rewritten)
    return rewritten


def _silenced(model, head, head_dim=16):
    """`model` (fused) with the output projections' rows of `head` zeroed: that head contributes nothing."""
    from lrdeploy.passes.layer_nodes import matmul_and_add
    from lrdeploy.passes.prune_heads import find_fused_attention_blocks

    graph = gs.import_onnx(model)
    for block in find_fused_attention_blocks(graph, find_linear_layers(graph)):
        weight = matmul_and_add(graph.tensors(), block.output)[0].inputs[1]
        values = weight.values.copy()
        values[head * head_dim:(head + 1) * head_dim] = 0
        weight.values = values
    return gs.export_onnx(graph)


def test_head_cut_inside_the_fused_graph_is_the_plain_cut_and_keeps_every_fusion(fused):
    from lrdeploy.passes.prune_heads import find_attention_blocks, find_fused_attention_blocks, prune_heads

    model, fused_model = fused
    plain_blocks = find_attention_blocks(find_linear_layers(gs.import_onnx(model)), heads=4)
    fused_blocks = find_fused_attention_blocks((graph := gs.import_onnx(fused_model)), find_linear_layers(graph))
    assert [(b.packed, b.heads, b.width, [p.d_out for p in b.projections]) for b in fused_blocks] == [(True, 4, 64, [192])] * 2
    plain_cuts, fused_cuts = _attention_cuts(model, plain_blocks, 2), _attention_cuts(fused_model, fused_blocks, 2)
    assert [heads for heads, _ in fused_cuts] == [heads for heads, _ in plain_cuts]

    def cut(blocks, cuts):
        def edit(graph):
            for block, (heads, neuron_cut) in zip(blocks, cuts):
                prune_heads(graph, block, heads, neuron_cut)
        return edit

    plain_pruned = _rewritten(model, cut(plain_blocks, plain_cuts))
    fused_pruned = _rewritten(fused_model, cut(fused_blocks, fused_cuts))
    assert fused_op_counts(fused_pruned) == FUSED
    attention = [n for n in fused_pruned.graph.node if n.op_type == "Attention"]
    assert [onnx.helper.get_attribute_value(a.attribute[0]) for a in attention] == [2, 2]
    widths = {i.name: tuple(i.dims) for i in fused_pruned.graph.initializer}
    assert [widths[a.input[1]] for a in attention] == [(64, 96)] * 2  # 2 heads × 16 for each of Q, K, V
    feed = _inputs(6, seed=5)
    np.testing.assert_allclose(run_model(fused_pruned, feed)[0], run_model(plain_pruned, feed)[0], atol=2e-5)


def test_silent_heads_leave_the_fused_graph_exactly(fused):
    from lrdeploy.passes.prune_heads import find_fused_attention_blocks, prune_heads

    silent = _silenced(fused[1], head=1)
    graph = gs.import_onnx(silent)
    cuts = _attention_cuts(silent, find_fused_attention_blocks(graph, find_linear_layers(graph)), 3)
    assert [heads for heads, _ in cuts] == [[0, 2, 3]] * 2

    def edit(graph):
        for block, (heads, cut) in zip(find_fused_attention_blocks(graph, find_linear_layers(graph)), cuts):
            prune_heads(graph, block, heads, cut)

    feed = _inputs(6, seed=7)
    np.testing.assert_allclose(run_model(_rewritten(silent, edit), feed)[0], run_model(silent, feed)[0], atol=2e-5)


def test_dropped_block_inside_the_fused_graph_is_the_plain_drop(fused):
    from lrdeploy.passes.drop_blocks import drop_block, find_transformer_blocks
    from lrdeploy.passes.prune_ffn import find_ffn_blocks
    from lrdeploy.passes.prune_heads import find_attention_blocks, find_fused_attention_blocks

    model, fused_model = fused

    def drop_first(graph, blocks):
        found = find_transformer_blocks(graph, blocks, find_ffn_blocks(graph, find_linear_layers(graph)))
        assert [b.name for b in found] == ["block0", "block1"]
        drop_block(graph, found[0])

    plain = _rewritten(model, lambda g: drop_first(g, find_attention_blocks(find_linear_layers(g), heads=4)))
    fused_dropped = _rewritten(fused_model, lambda g: drop_first(g, find_fused_attention_blocks(g, find_linear_layers(g))))
    assert fused_op_counts(fused_dropped)["Attention"] == 1
    feed = _inputs(6, seed=9)
    np.testing.assert_allclose(run_model(fused_dropped, feed)[0], run_model(plain, feed)[0], atol=2e-5)


def test_heads_keep_and_the_unified_plan_inside_the_fused_graph(exported, tmp_path):
    report, narrowed = _fused_cut_build(exported, tmp_path / "heads", "--heads-keep", "0.5")
    assert sorted(l["pattern"] for l in narrowed) == ["Attention", "Attention", "MatMul+SkipLayerNormalization",
                                                       "MatMul+SkipLayerNormalization"]
    assert all(l["reason"] == "2 of 4 heads kept (--heads-keep)" for l in narrowed)
    assert report["accuracy"]["outputs"]["embedding"]["cosine_mean"] > 0.8
    from lrdeploy.settings.build import BuildConfig
    from lrdeploy.stages.inspect import inspect_fused, inspect_model
    from lrdeploy.planning.blocks import find_block_parts

    config = BuildConfig.from_options(model=exported / "bert.onnx", optimize="ort", plan="unified")
    inspection = inspect_fused(inspect_model(config.model, 16), 16)
    parts = find_block_parts(config, inspection.graph, inspection.layers)
    assert [(p.attention.packed, p.ffn is not None, p.block.name, len(p.layers)) for p in parts] == [
        (True, True, "block0", 4), (True, True, "block1", 4)]


def test_blocks_with_different_head_counts_fuse_with_their_own(fused):
    """ORT's optimizer writes one head count on every Attention; after a head cut in one block only, each fused
    Attention must carry its own (else that block runs heads of the wrong size). Sharp attention (Q and K scaled)
    makes a wrong head split visible in the output."""
    from lrdeploy.passes.layer_nodes import matmul_and_add
    from lrdeploy.passes.prune_heads import find_attention_blocks, prune_heads

    graph = gs.import_onnx(fused[0])
    for block in find_attention_blocks(find_linear_layers(graph), heads=4):
        for layer in block.projections[:2]:
            weight = matmul_and_add(graph.tensors(), layer)[0].inputs[1]
            weight.values = weight.values * 6
    sharp = gs.export_onnx(graph)
    blocks = find_attention_blocks(find_linear_layers(gs.import_onnx(sharp)), heads=4)
    (heads, cut), _ = _attention_cuts(sharp, blocks, 2)

    def cut_first(graph):
        prune_heads(graph, find_attention_blocks(find_linear_layers(graph), heads=4)[0], heads, cut)

    mixed = _rewritten(sharp, cut_first)
    fused_mixed = fuse_for_onnxruntime(mixed)
    attention = [n for n in fused_mixed.graph.node if n.op_type == "Attention"]
    assert [onnx.helper.get_attribute_value(next(a for a in n.attribute if a.name == "num_heads")) for n in attention] == [2, 4]
    feed = _inputs(6, seed=3)
    np.testing.assert_allclose(run_model(fused_mixed, feed)[0], run_model(mixed, feed)[0], atol=1e-5)


def test_optimize_ort_says_what_it_fused_and_warns_when_no_attention_was(exported, tmp_path):
    """Issue 26: torch 2.x SDPA exports and hand-written graphs get no Attention fusion, and nothing said so."""
    fused = CliRunner().invoke(main, ["build", str(exported / "bert.onnx"), "--calib", str(exported / "calib.npz"),
                                      "--optimize", "ort", "--plan", "lowrank", "-o", str(tmp_path / "bert")])
    assert fused.exit_code == 0, fused.output
    said = " ".join(fused.output.split())
    assert "ONNX Runtime fused: 2 Attention, 2 BiasGelu, 1 EmbedLayerNormalization, 4 SkipLayerNormalization" in said
    assert "fused no Attention" not in said
    onnx.save(models.transformer(), tmp_path / "tiny.onnx")
    np.savez(tmp_path / "tiny.npz", **models.transformer_inputs(96))
    unfused = CliRunner().invoke(main, ["build", str(tmp_path / "tiny.onnx"), "--calib", str(tmp_path / "tiny.npz"),
                                        "--optimize", "ort", "--plan", "lowrank", "--rank-multiple", "8",
                                        "-o", str(tmp_path / "tiny")])
    assert unfused.exit_code == 0, unfused.output
    assert "ONNX Runtime's transformer optimizer fused no Attention in this model" in " ".join(unfused.output.split())


def test_an_rmsnorm_llama_builds_inside_the_fused_graph(tmp_path):
    """Issue 26: a Llama (RMSNorm, no LayerNormalization to read the width from) ended in a checker traceback on
    ONNX Runtime's SimplifiedLayerNormalization; now its geometry is read from the linear layers, the fused norms
    are kept, and the model is validated in ONNX Runtime."""
    from tests.factories import tiny_llama_dir

    tiny_llama_dir(tmp_path / "hf")
    exported = CliRunner().invoke(main, ["export", "--hf", str(tmp_path / "hf"), "--task", "text-generation",
                                         "-o", str(tmp_path / "llama.onnx")])
    assert exported.exit_code == 0, exported.output
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "c.npz", input_ids=rng.integers(3, 100, (32, 16)), attention_mask=np.ones((32, 16), np.int64))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "llama.onnx"), "--calib", str(tmp_path / "c.npz"),
                                       "--optimize", "ort", "--rank-budget", "0.5", "-o", str(tmp_path / "o"), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    fused = report["fused_ops"]
    assert fused["dense"].get("SkipSimplifiedLayerNormalization", 0) > 0 and fused["compressed"] == fused["dense"]
    assert report["accuracy"]["outputs"]["logits"]["next_token"]["positions"] > 0
    assert "fused no Attention" in result.stderr
