"""`lrdeploy distill` on a causal LM: trained on next-token KL and block outputs over text windows whose held-out
documents it never sees, exported with the teacher's interface (Optimum's KV-cache names here), reported with
perplexity, top-1 and KL."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from lrdeploy.cli import main  # noqa: E402
from tests.factories import tiny_llama_dir, tiny_llama_with_tokenizer_dir  # noqa: E402


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return tiny_llama_with_tokenizer_dir(tmp_path_factory.mktemp("llama"))


def test_next_token_kl_is_the_mean_over_real_positions_of_kl_teacher_to_student():
    from lrdeploy.torch.distill import next_token_kl

    generator = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 3, 5, generator=generator), torch.randn(2, 3, 5, generator=generator)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    p, q = torch.softmax(teacher, -1), torch.softmax(student, -1)
    expected = [float((p[b, t] * (p[b, t] / q[b, t]).log()).sum()) for b, t in ((0, 0), (0, 1), (1, 0))]
    total, count = next_token_kl(student, teacher, mask)
    assert count == 3 and float(total) == pytest.approx(sum(expected), rel=1e-5)
    assert float(next_token_kl(teacher, teacher, mask)[0]) == pytest.approx(0.0, abs=1e-6)


def test_training_windows_come_from_documents_apart_from_the_held_out_ones(llama_dir):
    from lrdeploy.calib.windows import text_documents, text_windows

    documents = text_documents([], pydoc=True)
    calibration, evaluation, rest = text_windows(documents, llama_dir, 32, 16, 8, seed=0, rest=True)
    _, same_evaluation = text_windows(documents, llama_dir, 32, 16, 8, seed=0)
    np.testing.assert_array_equal(evaluation["input_ids"], same_evaluation["input_ids"])
    held_out = {tuple(w) for w in evaluation["input_ids"]}
    trained = {tuple(w) for w in rest["input_ids"]} | {tuple(w) for w in calibration["input_ids"]}
    assert len(rest["input_ids"]) > 100 and not held_out & trained
    assert not {tuple(w) for w in calibration["input_ids"]} & {tuple(w) for w in rest["input_ids"]}


def test_a_causal_lm_is_distilled_on_next_token_kl_and_keeps_its_kv_cache_interface(llama_dir, tmp_path):
    from lrdeploy.calib.data import SampleSet, model_input_specs, with_prefill_inputs
    from tests.conftest import run_model

    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["distill", "--hf", str(llama_dir), "--task", "text-generation-with-past",
                                       "--rank-budget", "0.6", "--steps", "20", "--lr", "1e-3", "--window-tokens", "32",
                                       "--calib-windows", "32", "--eval-windows", "8", "--train-text", "pydoc",
                                       "-o", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    finetune = report["finetune"]
    checks = {h["step"]: h["check"] for h in finetune["history"]}
    assert finetune["metric"] == "kl" and list(checks) == [0, 20] and checks[0] == finetune["initial"]
    assert finetune["best"] == min(checks.values()) < finetune["initial"]  # distillation lowered the check KL
    lm = report["accuracy"]["outputs"]["logits"]["next_token"]
    assert lm["positions"] == 8 * 31 and lm["ppl_ratio"] > 0 and 0 <= lm["top1_agreement"] <= 1
    assert report["params"]["linear_ratio"] <= 0.6
    teacher, student = onnx.load(str(out / f"{llama_dir.name}.onnx")), onnx.load(str(out / f"{llama_dir.name}.lowrank.onnx"))
    assert [i.name for i in student.graph.input] == [i.name for i in teacher.graph.input]
    assert [o.name for o in student.graph.output] == [o.name for o in teacher.graph.output]
    assert "past_key_values.1.value" in {i.name for i in student.graph.input}
    embedding = [i for i in student.graph.initializer if tuple(i.dims) == (512, 64)]
    assert len(embedding) == 1  # the LM head still reads the one embedding table (tied)
    ids = np.load(out / "eval.npz", allow_pickle=False)["input_ids"][:2, :8]
    feed = with_prefill_inputs(SampleSet({"input_ids": ids, "attention_mask": np.ones_like(ids)}),
                               model_input_specs(student)).arrays
    logits, *presents = run_model(out / f"{llama_dir.name}.lowrank.onnx", feed)
    assert logits.shape == (2, 8, 512) and presents[0].shape == (2, 2, 8, 16)
    assert "perplexity ×" in result.output and "next-token KL (nats) on the check split" in result.output
    assert 'alt="distillation curve"' in (out / "report.html").read_text()


def test_target_cosine_is_refused_for_a_causal_lm(llama_dir, tmp_path):
    result = CliRunner().invoke(main, ["distill", "--hf", str(llama_dir), "--target-cosine", "0.9", "-o",
                                       str(tmp_path / "out")])
    assert result.exit_code == 1 and not (tmp_path / "out").exists()
    assert result.stderr.startswith("Error: --target-cosine searches a budget by the embedding's cosine")


def test_removing_a_decoder_block_renumbers_the_cache_layers(tmp_path):
    """A Llama student with block 0 removed generates with its KV cache as without it: the remaining decoder
    layer writes cache layer 0, and the config counts one layer."""
    from types import SimpleNamespace

    from transformers import AutoModelForCausalLM

    from lrdeploy.torch.compress import remove_blocks

    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir(tmp_path / "hf"))).eval()
    weight = model.model.layers[0].mlp.up_proj.weight.detach().numpy().T
    assert remove_blocks(model, [(SimpleNamespace(name="block0"), [SimpleNamespace(name="up", weight=weight)], 0)]) == [0]
    assert model.config.num_hidden_layers == 1 and model.model.layers[0].self_attn.layer_idx == 0
    prompt = torch.tensor([[5, 17, 42, 7]])
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=True, pad_token_id=0)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False, pad_token_id=0)
    assert torch.equal(cached, uncached)
