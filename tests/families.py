"""The encoder families of issue 26 as small random Hugging Face models (hidden 64, 2 blocks, seeded), exported by
torch's legacy or dynamo exporter, and one build of a cut on an export, told as ok / an `Error:` line / a bug.
Used by `tests/pipeline/test_family_matrix.py` (the regression table) and `benchmarks/tools/family_matrix.py`
(the table with figures)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from click.testing import CliRunner

from lrdeploy.cli import main

HIDDEN, HEADS, FFN, LAYERS = 64, 4, 128, 2
CUTS = {
    "low-rank 0.5": ["--plan", "lowrank", "--rank-budget", "0.5"],
    "heads 0.5": ["--heads-keep", "0.5", "--rank-budget", "1"],
    "FFN 0.5": ["--ffn-keep", "0.5", "--rank-budget", "1"],
    "drop 1": ["--drop-blocks", "1", "--rank-budget", "1"],
    "unified 0.5": ["--plan", "unified", "--rank-budget", "0.5", "--sensitivity-samples", "4"],
    "optimize ort": ["--optimize", "ort", "--rank-budget", "0.5"],
}


class FirstOutput(torch.nn.Module):
    """The model's main output as one tensor: logits for a classifier, else the last hidden state."""

    def __init__(self, model: torch.nn.Module, names: list[str]):
        super().__init__()
        self.model, self.names = model, names

    def forward(self, *inputs):  # positional: both exporters pass them in `names`' order
        output = self.model(**dict(zip(self.names, inputs)))
        return output.logits if hasattr(output, "logits") else output.last_hidden_state


def _text(vocab: int = 512, seq: int = 16, mask: bool = True):
    def make(count: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        inputs = {"input_ids": rng.integers(3, vocab, (count, seq), dtype=np.int64)}
        if mask:
            inputs["attention_mask"] = np.ones((count, seq), dtype=np.int64)
        return inputs
    return make


def _pixels(size: int = 32):
    def make(count: int, seed: int) -> dict[str, np.ndarray]:
        return {"pixel_values": np.random.default_rng(seed).standard_normal((count, 3, size, size)).astype(np.float32)}
    return make


def _audio(bins: int = 16, frames: int = 64):
    def make(count: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"input_features": rng.standard_normal((count, bins, frames)).astype(np.float32)}
    return make


def _decoder_inputs(vocab: int = 512, seq: int = 16):
    """A decoder's token ids and the encoder's states it cross-attends to (16 positions)."""
    def make(count: int, seed: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        return {"input_ids": rng.integers(3, vocab, (count, seq), dtype=np.int64),
                "encoder_hidden_states": rng.standard_normal((count, 16, HIDDEN)).astype(np.float32)}
    return make


def family_models():
    """{family: (a function making the torch model, a function making `count` inputs from a seed)}."""
    import transformers as t

    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                  initializer_range=0.2)
    whisper = t.WhisperConfig(num_mel_bins=16, max_source_positions=32, d_model=HIDDEN, encoder_layers=LAYERS,
                              decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                              encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=512, pad_token_id=0, bos_token_id=1,
                              eos_token_id=2, decoder_start_token_id=1, init_std=0.2)
    t5 = t.T5Config(vocab_size=512, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
                    initializer_factor=2.0, decoder_start_token_id=0)
    return {
        "BERT classifier": (lambda: t.BertForSequenceClassification(t.BertConfig(vocab_size=512, num_labels=3, **common)),
                            _text()),
        "RoBERTa classifier": (lambda: t.RobertaForSequenceClassification(t.RobertaConfig(
            vocab_size=512, num_labels=3, max_position_embeddings=40, **common)), _text()),
        "DistilBERT classifier": (lambda: t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=512, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, num_labels=3,
            initializer_range=0.2)), _text()),
        "ViT": (lambda: t.ViTForImageClassification(t.ViTConfig(image_size=32, patch_size=8, num_labels=5, **common)),
                _pixels()),
        "DeiT": (lambda: t.DeiTForImageClassification(t.DeiTConfig(image_size=32, patch_size=8, num_labels=5, **common)),
                 _pixels()),
        "Swin": (lambda: t.SwinForImageClassification(t.SwinConfig(
            image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=5,
            initializer_range=0.2)), _pixels()),
        "CLIP text": (lambda: t.CLIPTextModel(t.CLIPTextConfig(vocab_size=512, max_position_embeddings=16, **common)),
                      _text()),
        "CLIP vision": (lambda: t.CLIPVisionModel(t.CLIPVisionConfig(image_size=32, patch_size=8, **common)),
                        _pixels()),
        "Whisper encoder": (lambda: t.WhisperModel(whisper).get_encoder(), _audio()),
        "Whisper decoder": (lambda: t.WhisperModel(whisper).get_decoder(), _decoder_inputs()),  # with cross-attention
        "T5 encoder": (lambda: t.T5EncoderModel(t5), _text()),
        "T5 decoder": (lambda: t.T5Model(t5).get_decoder(), _decoder_inputs()),  # relative bias, cross-attention
    }


def export(model: torch.nn.Module, inputs: dict[str, np.ndarray], path: Path, exporter: str) -> None:
    """`model` wrapped to one output, exported by `exporter`, checked against PyTorch in ONNX Runtime."""
    import onnxruntime as ort

    example = {name: torch.from_numpy(value[:2]) for name, value in inputs.items()}
    module = FirstOutput(model.eval(), list(example)).eval()
    output = "logits" if type(model).__name__.endswith("Classification") else "last_hidden_state"
    with torch.no_grad():
        expected = module(*example.values()).numpy()
        if exporter == "legacy":
            axes = {name: {0: "batch"} for name in example} | {output: {0: "batch"}}
            torch.onnx.export(module, tuple(example.values()), str(path), dynamo=False, opset_version=17,
                              input_names=list(example), output_names=[output], dynamic_axes=axes)
        else:
            batch = torch.export.Dim("batch", min=1, max=1024)
            program = torch.onnx.export(module, tuple(example.values()), dynamo=True, input_names=list(example),
                                        output_names=[output], dynamic_shapes=[tuple({0: batch} for _ in example)])
            program.save(str(path))
    got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {name: value[:2] for name, value in inputs.items()})[0]
    assert np.allclose(got, expected, atol=1e-3 * max(1.0, np.abs(expected).max())), "export parity"


def run_cell(model: Path, calib: Path, evaluation: Path, cut: list[str], out: Path) -> tuple[str, str]:
    """('ok' | 'error' | 'bug', what happened) of one build."""
    result = CliRunner().invoke(main, ["build", str(model), "--calib", str(calib), "--eval", str(evaluation),
                                       "--no-cache", "-o", str(out), "--json", "--batch-size", "8", *cut])
    if result.exit_code == 0:
        report = json.loads(result.stdout)
        statuses = [layer["status"] for layer in report["layers"]]
        output = next(iter(report["accuracy"]["outputs"].values()))
        changed = {status: statuses.count(status) for status in ("factorized", "narrowed", "dropped")
                   if status in statuses}
        figure = (f"top-1 {output['classes']['top1_agreement']:.2f}" if output.get("classes")
                  else f"cos {output['cosine_mean']:.3f}")
        fused = report["fused_ops"]["compressed"]
        return "ok", (f"{figure}, linear ×{report['params']['linear_ratio']:.2f}, "
                      + ", ".join(f"{n} {s}" for s, n in changed.items())
                      + (f"; fused {', '.join(f'{n} {op}' for op, n in fused.items())}" if "--optimize" in cut else ""))
    if result.exit_code == 1 and result.exception is None or isinstance(result.exception, SystemExit):
        lines = [line for line in (result.stderr if result.stderr_bytes else result.output).splitlines()
                 if line.startswith("Error:")]
        return "error", lines[-1] if lines else result.output.strip().splitlines()[-1]
    return "bug", f"{type(result.exception).__name__}: {str(result.exception).splitlines()[0][:200]}"
