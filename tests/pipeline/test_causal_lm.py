"""A causal LM exported by `export --hf --task text-generation` builds end to end, and its report carries the
figures a language model is judged by: perplexity of both models (equal to PyTorch's), their ratio, next-token
agreement and KL, in report.json, report.md and the console."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from lrdeploy.cli import main  # noqa: E402
from lrdeploy.runtime.generate import greedy_tokens  # noqa: E402
from tests.factories import tiny_llama_dir  # noqa: E402


def _windows(count, seq=16, seed=0):
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(0, 512, size=(count, seq)), "attention_mask": np.ones((count, seq), np.int64)}


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    from lrdeploy.export.torch_onnx import export_hf

    folder = tmp_path_factory.mktemp("llama")
    export_hf(tiny_llama_dir(folder / "hf"), folder / "lm.onnx", task="text-generation")
    np.savez(folder / "calib.npz", **_windows(96))
    evaluation = _windows(12, seed=1)
    evaluation["attention_mask"][3, 9:] = 0  # one right-padded window: its padding is not scored
    np.savez(folder / "eval.npz", **evaluation)
    return folder


def _export(folder, path, exporter):
    """The causal LM in `folder` as `export --hf --task text-generation` writes it (torch's legacy exporter), or as
    torch's dynamo exporter writes it (other node names, SDPA-free eager attention traced to plain ops)."""
    import warnings

    import torch

    from lrdeploy.export.torch_onnx import causal_lm, export_hf

    if exporter == "legacy":
        export_hf(folder, path, task="text-generation")
        return
    module, _ = causal_lm(folder)
    ids, mask = torch.randint(0, 512, (2, 16)), torch.ones(2, 16, dtype=torch.int64)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("seq")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (ids, mask), str(path), dynamo=True, input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], verbose=False,
                          dynamic_shapes={"input_ids": {0: batch, 1: seq}, "attention_mask": {0: batch, 1: seq}})


def _torch_perplexity(folder, evaluation):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder / "hf")).eval()
    ids, mask = (torch.from_numpy(evaluation[k]) for k in ("input_ids", "attention_mask"))
    with torch.no_grad():
        log_p = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
    scored = (mask[:, :-1] * mask[:, 1:]).bool()
    nll = -log_p[:, :-1].gather(-1, ids[:, 1:, None])[..., 0][scored]
    return float(torch.exp(nll.mean())), int(scored.sum())


def test_report_leads_with_perplexity_equal_to_pytorchs(llama, tmp_path):
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["build", str(llama / "lm.onnx"), "--calib", str(llama / "calib.npz"),
                                       "--eval", str(llama / "eval.npz"), "--rank-budget", "0.5", "--plan", "lowrank",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    figures = report["accuracy"]["outputs"]["logits"]["next_token"]
    perplexity, positions = _torch_perplexity(llama, dict(np.load(llama / "eval.npz")))
    assert figures["positions"] == positions == 11 * 15 + 8
    np.testing.assert_allclose(figures["ppl_dense"], perplexity, rtol=1e-4)
    assert figures["ppl"] > figures["ppl_dense"]  # half the parameters cost something
    np.testing.assert_allclose(figures["ppl_ratio"], figures["ppl"] / figures["ppl_dense"])
    assert 0 < figures["top1_agreement"] < 1 and figures["kl"] > 0
    assert "Next-token figures of 'logits'" in result.output
    assert f"×{figures['ppl_ratio']:.3f}" in (out / "report.md").read_text()
    assert "perplexity (" in (out / "report.html").read_text()


def test_full_rank_is_the_dense_model_and_measures_nothing(llama, tmp_path):
    """--rank-budget 1 with no cut keeps every layer: nothing is calibrated, decomposed or measured (on an LLM the
    unified plan's measurements alone take many minutes), and the model is checked like any other."""
    out = tmp_path / "full"
    result = CliRunner().invoke(main, ["build", str(llama / "lm.onnx"), "--calib", str(llama / "calib.npz"),
                                       "--eval", str(llama / "eval.npz"), "--rank-budget", "1", "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    figures = report["accuracy"]["outputs"]["logits"]["next_token"]
    assert figures["top1_agreement"] == 1.0 and abs(figures["ppl_ratio"] - 1) < 1e-5 and figures["kl"] < 1e-8
    assert not {"calibrate", "sensitivity", "shape options"} & set(report["timings"])
    assert report["params"]["linear_ratio"] == 1.0 and report["params"]["linear_before"] > 0
    assert {layer["status"] for layer in report["layers"]} <= {"dense", "skipped"}


def _silenced_build(tmp_path, exporter, silence, *cut):
    """The tiny Llama with `silence(model)` applied (under no_grad), exported by `exporter`, built at ρ=1 with
    `cut`; returns (report, compressed model path) after checking the logits equal the dense model's."""
    import torch
    from transformers import AutoModelForCausalLM

    from tests.conftest import run_model

    folder = tiny_llama_dir(tmp_path / "hf")
    model = AutoModelForCausalLM.from_pretrained(str(folder))
    with torch.no_grad():
        silence(model)
    model.save_pretrained(str(folder))
    _export(folder, tmp_path / "lm.onnx", exporter)
    np.savez(tmp_path / "calib.npz", **_windows(96))
    np.savez(tmp_path / "eval.npz", **_windows(8, seed=1))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "lm.onnx"), "--calib", str(tmp_path / "calib.npz"),
                                       "--eval", str(tmp_path / "eval.npz"), "--rank-budget", "1", *cut,
                                       "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    feed = _windows(4, seed=2)
    (dense,) = run_model(tmp_path / "lm.onnx", feed)
    (compressed,) = run_model(tmp_path / "out" / "lm.lowrank.onnx", feed)
    np.testing.assert_allclose(compressed, dense, atol=2e-4 * np.abs(dense).max())
    return json.loads((tmp_path / "out" / "report.json").read_text()), tmp_path / "out" / "lm.lowrank.onnx"


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_gated_mlp_neurons_that_contribute_nothing_are_removed_exactly(tmp_path, exporter):
    """SwiGLU: down(silu(gate(x)) ⊙ up(x)). With half the neurons' down rows zero, --ffn-keep 0.5 keeps the other
    half in gate and up alike and the logits stay the dense model's to float error."""
    import onnx

    def silence(model):
        for layer in model.model.layers:
            layer.mlp.down_proj.weight[:, 1::2] = 0  # every odd neuron contributes nothing

    report, built = _silenced_build(tmp_path, exporter, silence, "--ffn-keep", "0.5")
    narrowed = [layer for layer in report["layers"] if layer["status"] == "narrowed"]
    assert len(narrowed) == 6 and all("64 of 128 FFN neurons kept" in layer["reason"] for layer in narrowed)
    assert not any(128 in i.dims for i in onnx.load(str(built)).graph.initializer)  # gate, up [64, 64], down [64, 64]
    assert report["params"]["linear_ratio"] < 0.8


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_grouped_query_heads_that_contribute_nothing_are_removed_exactly(tmp_path, exporter):
    """Llama with 4 query heads sharing 2 key/value heads: with the second key/value head's query heads writing
    nothing (their output rows zero), --heads-keep 0.5 removes that key/value head with its 2 query heads (Q, K, V
    columns and O rows) and the logits stay the dense model's; rotary positions and repeat_kv still fit."""
    import onnx

    def silence(model):
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[:, 32:] = 0  # query heads 2 and 3 (key/value head 1) write nothing

    report, built = _silenced_build(tmp_path, exporter, silence, "--heads-keep", "0.5")
    narrowed = [layer for layer in report["layers"] if layer["status"] == "narrowed"]
    assert len(narrowed) == 8 and all("1 of 2 key/value heads (2 of 4 query heads) kept" in layer["reason"]
                                      for layer in narrowed)
    attention = sorted(tuple(i.dims) for i in onnx.load(str(built)).graph.initializer
                       if "heads" in i.name and len(i.dims) == 2)
    assert attention == sorted([(64, 32), (64, 16), (64, 16), (32, 64)] * 2)  # Q, K, V [64, kept], O [32, 64]


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_a_llama_block_that_adds_nothing_is_dropped_exactly(tmp_path, exporter):
    """Pre-RMSNorm blocks: with block 0's attention output and MLP down projection zero, --drop-blocks 1 drops
    that block on the residual stream (all 7 projections gone from the written model) and the logits stay the
    dense model's; rotary positions and the causal mask, shared by the blocks, stay."""
    import onnx

    def silence(model):
        model.model.layers[0].self_attn.o_proj.weight.zero_()
        model.model.layers[0].mlp.down_proj.weight.zero_()

    report, built = _silenced_build(tmp_path, exporter, silence, "--drop-blocks", "1")
    dropped = [layer for layer in report["layers"] if layer["status"] == "dropped"]
    assert len(dropped) == 7 and all(layer["reason"].startswith("block0 dropped") for layer in dropped)
    dense_matmuls = sum(n.op_type == "MatMul" for n in onnx.load(str(tmp_path / "lm.onnx")).graph.node)
    assert sum(n.op_type == "MatMul" for n in onnx.load(str(built)).graph.node) == dense_matmuls - 9  # 7 + 2 products


def test_a_model_exported_with_its_kv_cache_builds_and_runs_in_a_generation_loop(tmp_path):
    """export --task text-generation-with-past (Optimum's names) builds on prefill windows (an empty past, position
    ids counted), keeps its interface (the KV cache's head count too: no head cut is offered), and the compressed
    model runs in the same greedy loop: exactly the dense one at full rank."""
    import onnx

    from lrdeploy.export.torch_onnx import export_hf

    export_hf(tiny_llama_dir(tmp_path / "hf"), tmp_path / "lm.onnx", task="text-generation-with-past")
    np.savez(tmp_path / "calib.npz", **_windows(96))
    names = [i.name for i in onnx.load(str(tmp_path / "lm.onnx")).graph.input]
    assert names[:3] == ["input_ids", "attention_mask", "position_ids"] and names[3] == "past_key_values.0.key"
    dense_tokens, dense_logits = greedy_tokens(tmp_path / "lm.onnx", [5, 9, 200], 5)
    for budget, out in (("1", "full"), ("0.7", "cut")):
        result = CliRunner().invoke(main, ["build", str(tmp_path / "lm.onnx"), "--calib", str(tmp_path / "calib.npz"),
                                           "--rank-budget", budget, "-o", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        built = onnx.load(str(tmp_path / out / "lm.lowrank.onnx"))
        assert [i.name for i in built.graph.input] == names
        tokens, logits = greedy_tokens(tmp_path / out / "lm.lowrank.onnx", [5, 9, 200], 5)
        assert len(tokens) == 8
        if budget == "1":
            assert tokens == dense_tokens
            np.testing.assert_allclose(logits, dense_logits, atol=1e-4 * np.abs(dense_logits).max())
    report = json.loads((tmp_path / "cut" / "report.json").read_text())
    assert report["params"]["linear_ratio"] <= 0.7
    assert not any("heads kept" in layer["reason"] for layer in report["layers"])


def test_heads_keep_refuses_a_model_with_a_kv_cache(tmp_path):
    from lrdeploy.export.torch_onnx import export_hf

    export_hf(tiny_llama_dir(tmp_path / "hf"), tmp_path / "lm.onnx", task="text-generation-with-past")
    np.savez(tmp_path / "calib.npz", **_windows(96))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "lm.onnx"), "--calib", str(tmp_path / "calib.npz"),
                                       "--heads-keep", "0.5", "-o", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: --heads-keep would change the head count of the model's KV cache")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_gpt2_ffn_neurons_that_contribute_nothing_are_removed_exactly(tmp_path, exporter):
    """GPT-2's Conv1D MLP (torch's legacy exporter: Reshape → Gemm on [tokens, d] → Reshape to [b, t, f], tanh-GELU
    spelled out in elementwise ops): with half the neurons' c_proj rows zero, --ffn-keep 0.5 keeps the other half
    (c_fc's columns, the Reshape's neuron count, c_proj's rows) and the logits stay the dense model's; inspect
    says why the fused c_attn is no FFN."""
    import onnx
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import run_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0, initializer_range=0.2))  # GELU not ~linear
    with torch.no_grad():
        for block in model.transformer.h:
            block.mlp.c_proj.weight[1::2, :] = 0  # Conv1D weight [f, d]: every odd neuron writes nothing
    model.save_pretrained(str(tmp_path / "gpt2"))
    _export(tmp_path / "gpt2", tmp_path / "gpt2.onnx", exporter)
    inspected = CliRunner().invoke(main, ["inspect", str(tmp_path / "gpt2.onnx"), "--json"])
    assert inspected.exit_code == 0, inspected.output
    blocks = json.loads(inspected.stdout)["blocks"]
    assert blocks["ffn"] == 2
    np.savez(tmp_path / "calib.npz", **_windows(96))
    result = CliRunner().invoke(main, ["build", str(tmp_path / "gpt2.onnx"), "--calib", str(tmp_path / "calib.npz"),
                                       "--rank-budget", "1", "--ffn-keep", "0.5", "--json", "-o", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    narrowed = [layer for layer in report["layers"] if layer["status"] == "narrowed"]
    assert len(narrowed) == 4 and all("128 of 256 FFN neurons kept" in layer["reason"] for layer in narrowed)
    built = onnx.load(str(tmp_path / "out" / "gpt2.lowrank.onnx"))
    assert not any(256 in i.dims for i in built.graph.initializer)
    feed = _windows(4, seed=2)
    (dense,) = run_model(tmp_path / "gpt2.onnx", feed)
    (compressed,) = run_model(tmp_path / "out" / "gpt2.lowrank.onnx", feed)
    np.testing.assert_allclose(compressed, dense, atol=2e-4 * np.abs(dense).max())
    split = CliRunner().invoke(main, ["build", str(tmp_path / "gpt2.onnx"), "--calib", str(tmp_path / "calib.npz"),
                                      "--rank-budget", "0.6", "--plan", "lowrank", "--json", "-o", str(tmp_path / "s")])
    assert split.exit_code == 0, split.output
    assert json.loads(split.stdout)["params"]["linear_ratio"] <= 0.6



@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
def test_gpt2_fused_qkv_heads_and_silent_blocks_are_removed_exactly(tmp_path, exporter):
    """GPT-2's one c_attn projection is cut in three by a Split: with heads 2 and 3 writing nothing (their c_proj
    rows zero), --heads-keep 0.5 keeps heads 0 and 1 in each of Q, K and V (the Split's sizes, the Reshapes' counts
    follow) and the logits stay; with block 0 adding nothing (both c_proj weights and biases zero), --drop-blocks 1
    drops it on the residual stream, exactly."""
    import onnx
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.conftest import run_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=512, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       bos_token_id=0, eos_token_id=0, initializer_range=0.2))
    with torch.no_grad():
        for block in model.transformer.h:
            block.attn.c_proj.weight[32:, :] = 0  # Conv1D weight [context, d]: heads 2 and 3 write nothing
        for projection in (model.transformer.h[0].attn.c_proj, model.transformer.h[0].mlp.c_proj):
            projection.weight.zero_()
            projection.bias.zero_()
    model.save_pretrained(str(tmp_path / "gpt2"))
    _export(tmp_path / "gpt2", tmp_path / "gpt2.onnx", exporter)
    np.savez(tmp_path / "calib.npz", **_windows(96))
    feed = _windows(4, seed=2)
    (dense,) = run_model(tmp_path / "gpt2.onnx", feed)
    for cut, out in ((["--heads-keep", "0.5"], "heads"), (["--drop-blocks", "1"], "drop")):
        result = CliRunner().invoke(main, ["build", str(tmp_path / "gpt2.onnx"), "--calib", str(tmp_path / "calib.npz"),
                                           "--rank-budget", "1", *cut, "--json", "-o", str(tmp_path / out)])
        assert result.exit_code == 0, result.output
        report = json.loads(result.stdout)
        (compressed,) = run_model(tmp_path / out / "gpt2.lowrank.onnx", feed)
        np.testing.assert_allclose(compressed, dense, atol=2e-4 * np.abs(dense).max())
        statuses = [layer["status"] for layer in report["layers"]]
        if out == "heads":
            assert statuses.count("narrowed") == 4
            built = onnx.load(str(tmp_path / out / "gpt2.lowrank.onnx"))
            qkv = sorted(tuple(i.dims) for i in built.graph.initializer if "qkv/weight" in i.name)
            assert qkv == [(64, 96), (64, 96)]  # 2 of 4 heads × 16 for each of Q, K, V
        else:
            weighted = [layer for layer in report["layers"] if layer["status"] != "skipped"]
            assert [layer["status"] for layer in weighted[:4]] == ["dropped"] * 4  # block 0, in model order
            assert statuses.count("dropped") == 4
