"""PyTorch → ONNX export: parity with PyTorch, dynamic axes, clean names, clear errors."""

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

pytest.importorskip("torch")
pytest.importorskip("transformers")

from lrdeploy.cli import main  # noqa: E402
from lrdeploy.errors import ExportError  # noqa: E402
from lrdeploy.export.torch_onnx import export_factory, export_hf  # noqa: E402
from tests.conftest import run_model  # noqa: E402
from tests.factories import tiny_bert_dir  # noqa: E402


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    return tiny_bert_dir(tmp_path_factory.mktemp("bert"))


@pytest.mark.parametrize("pooling, normalize, output", [("mean", True, "embedding"), ("cls", False, "embedding"),
                                                         ("none", False, "last_hidden_state")])
def test_hf_export_matches_pytorch_with_dynamic_axes(bert_dir, tmp_path, pooling, normalize, output):
    import torch

    from lrdeploy.export.torch_onnx import sentence_embedder

    result = export_hf(bert_dir, tmp_path / "m.onnx", pooling, normalize)
    assert result.max_abs_diff <= 1e-4 and result.output_names == [output]
    model = onnx.load(str(tmp_path / "m.onnx"))
    assert [i.name for i in model.graph.input] == ["input_ids", "attention_mask"]
    assert max(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 17
    assert len(model.graph.initializer) > 10  # weights are initializers, not Constant nodes
    # another batch and sequence length than the example: the axes are dynamic
    module, _ = sentence_embedder(bert_dir, pooling, normalize)
    ids = torch.randint(1, 3000, (5, 23))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    with torch.no_grad():
        expected = module(input_ids=ids, attention_mask=mask).numpy()
    (actual,) = run_model(tmp_path / "m.onnx", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(actual, expected, atol=1e-4)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(actual, axis=1), 1.0, rtol=1e-5)


def test_factory_export_and_cli(tmp_path):
    result = export_factory("tests.factories:tiny_mlp", tmp_path / "mlp.onnx")
    assert result.input_names == ["input"] and result.output_names == ["output"] and result.max_abs_diff <= 1e-5
    cli = CliRunner().invoke(main, ["export", "--factory", "tests.factories:tiny_mlp", "-o", str(tmp_path / "c.onnx")])
    assert cli.exit_code == 0, cli.output
    assert "ONNX Runtime vs PyTorch max abs difference" in cli.output
    (out,) = run_model(tmp_path / "c.onnx", {"input": np.ones((3, 7, 32), np.float32)})
    assert out.shape == (3, 7, 16)


def test_tolerance_is_enforced(tmp_path):
    with pytest.raises(ExportError, match=r"ONNX Runtime differs from PyTorch by .* above --tolerance 0"):
        export_factory("tests.factories:tiny_mlp", tmp_path / "m.onnx", tolerance=0.0)
    assert not list(tmp_path.iterdir())  # nothing half-written


@pytest.mark.parametrize("args, message", [
    (["--factory", "tests.factories"], r"is not a factory; write it as package.module:function"),
    (["--factory", "tests.nowhere:f"], r"cannot load factory 'tests.nowhere:f'"),
    (["--factory", "tests.factories:not_a_pair"], r"must return \(module, \{input name: example tensor\}\)"),
    (["--hf", "/nonexistent/dir"], r"is not a Hugging Face model folder \(no config.json\)"),
])
def test_export_errors(tmp_path, args, message):
    import re

    result = CliRunner().invoke(main, ["export", *args, "-o", str(tmp_path / "x.onnx")])
    assert result.exit_code == 1, result.output
    assert re.search(message, result.stderr) and result.stderr.startswith("Error: ")


def _break_folder(folder, damage):
    if damage == "malformed config.json":
        (folder / "config.json").write_text("{not json")
    for weights in [*folder.glob("*.safetensors"), *folder.glob("*.bin")]:
        if damage == "no weights":
            weights.unlink()
        elif damage == "truncated safetensors":
            weights.write_bytes(weights.read_bytes()[:1000])


@pytest.mark.parametrize("damage, cause", [("malformed config.json", r"OSError: .*config.json.* is not a valid JSON"),
                                           ("no weights", r"OSError: .*no file named"),
                                           ("truncated safetensors", r"SafetensorError|Error")])
def test_broken_hf_folder_is_one_error_line(bert_dir, tmp_path, damage, cause):
    import re
    import shutil

    folder = tmp_path / "broken"
    shutil.copytree(bert_dir, folder)
    _break_folder(folder, damage)
    result = CliRunner().invoke(main, ["export", "--hf", str(folder), "-o", str(tmp_path / "m.onnx")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot load the Hugging Face model in {folder} (") and re.search(cause, line)
    assert line.endswith("check its config.json and that its weights (model.safetensors or pytorch_model.bin) are "
                         "complete")
    assert not (tmp_path / "m.onnx").exists()


def test_export_hf_of_a_small_vocabulary_and_of_image_and_audio_encoders(tmp_path):
    """Issue 26: example token ids were drawn from 1000–2000 (IndexError under 2000 words); a vision folder ended
    in an AttributeError. A 100-word BERT exports; a ViT and Whisper's encoder export as feature extractors
    (pixel values / log-mel frames → pooled embedding, the batch dynamic) that match PyTorch; a ViT asked for a
    text classifier is one Error line."""
    import torch
    from transformers import BertConfig, BertModel, ViTConfig, ViTModel, WhisperConfig, WhisperModel


    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32)).save_pretrained(str(tmp_path / "bert"))
    vit = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=16)).eval()
    vit.save_pretrained(str(tmp_path / "vit"))
    WhisperModel(WhisperConfig(num_mel_bins=16, max_source_positions=16, d_model=32, encoder_layers=1,
                               decoder_layers=1, encoder_attention_heads=2, decoder_attention_heads=2,
                               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=64, pad_token_id=0, bos_token_id=1,
                               eos_token_id=2, decoder_start_token_id=1)).save_pretrained(str(tmp_path / "whisper"))
    small = CliRunner().invoke(main, ["export", "--hf", str(tmp_path / "bert"), "-o", str(tmp_path / "bert.onnx")])
    assert small.exit_code == 0, small.output
    for name, extra in (("vit", ["--pooling", "cls", "--no-normalize"]), ("whisper", [])):
        result = CliRunner().invoke(main, ["export", "--hf", str(tmp_path / name), "-o", str(tmp_path / f"{name}.onnx"),
                                           *extra])
        assert result.exit_code == 0, result.output
    pixels = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    with torch.no_grad():
        want = vit(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 0].numpy()
    np.testing.assert_allclose(run_model(tmp_path / "vit.onnx", {"pixel_values": pixels})[0], want, atol=1e-5)
    frames = np.zeros((4, 16, 32), np.float32)
    (embedding,) = run_model(tmp_path / "whisper.onnx", {"input_features": frames})
    assert embedding.shape == (4, 32) and np.allclose(np.linalg.norm(embedding, axis=1), 1, atol=1e-5)
    vision = CliRunner().invoke(main, ["export", "--hf", str(tmp_path / "vit"), "--task", "text-classification",
                                       "-o", str(tmp_path / "vit-cls.onnx")])
    assert vision.exit_code == 1 and not (tmp_path / "vit-cls.onnx").exists()
    (line,) = vision.stderr.strip().splitlines()
    assert line.startswith(f"Error: cannot load the Hugging Face model in {tmp_path / 'vit'} (")


@pytest.mark.parametrize("tie", [True, False])
def test_causal_lm_export_keeps_logits_and_a_tied_head_tied(tmp_path, tie):
    import torch
    from transformers import AutoModelForCausalLM

    from tests.factories import tiny_llama_dir

    folder = tiny_llama_dir(tmp_path / "llama", tie=tie)
    result = export_hf(folder, tmp_path / "lm.onnx", task="text-generation")
    assert result.input_names == ["input_ids", "attention_mask"] and result.output_names == ["logits"]
    model = onnx.load(str(tmp_path / "lm.onnx"))
    embedding_shaped = [i for i in model.graph.initializer if sorted(i.dims) == [64, 512]]
    assert len(embedding_shaped) == (1 if tie else 2)  # a tied head is the embedding table, not a second copy
    reference = AutoModelForCausalLM.from_pretrained(str(folder)).eval()
    ids = torch.randint(0, 512, (3, 11))
    mask = torch.ones_like(ids)
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits.numpy()
    (actual,) = run_model(tmp_path / "lm.onnx", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
    np.testing.assert_allclose(actual, expected, atol=1e-4 * max(1.0, np.abs(expected).max()))


def test_export_task_is_checked(tmp_path):
    with pytest.raises(ExportError, match="--task 'translation' is not one of feature-extraction, text-generation"):
        export_hf(tmp_path, tmp_path / "m.onnx", task="translation")
