"""Hugging Face Optimum's ONNX exports of the small random models of `family_matrix.py` (same configurations),
for its `--optimum DIR` column. Runs in a separate environment, because optimum-onnx 0.1.0 pins transformers 4.57
(lrdeploy's own environment has transformers 5):

    python3 -m venv /work/optenv && /work/optenv/bin/pip install torch==2.13.0 "optimum-onnx[onnxruntime]==0.1.0"
    /work/optenv/bin/python benchmarks/tools/optimum_exports.py OUT_DIR

Writes OUT_DIR/<family>/hf (the model folder) and OUT_DIR/<family>/onnx (what `optimum-cli export onnx --task
TASK` writes: model.onnx, or encoder_model.onnx and the decoders for sequence-to-sequence models), and
OUT_DIR/exports.json: {row: {"model": ONNX file, "family": family}}. With `--fixtures DIR`, also the graphs the
tests keep (tests/data/optimum/): each export with its float tensors of 16 or more elements zeroed, so that the
file holds the exporter's spelling of the graph and almost nothing else; `tests/optimum_graphs.py` fills them with
seeded random values.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper
import torch
import transformers as t
from optimum.exporters.onnx import main_export

HIDDEN, HEADS, FFN, LAYERS = 64, 4, 128, 2
COMMON = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
              initializer_range=0.2)


def models():
    """{family: (model, Optimum's task, {row name: ONNX file in the export})}."""
    whisper = t.WhisperConfig(num_mel_bins=16, max_source_positions=1500,  # Optimum's dummy audio: 3000 frames
                               d_model=HIDDEN, encoder_layers=LAYERS,
                              decoder_layers=LAYERS, encoder_attention_heads=HEADS, decoder_attention_heads=HEADS,
                              encoder_ffn_dim=FFN, decoder_ffn_dim=FFN, vocab_size=512, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, decoder_start_token_id=1, max_target_positions=64,
                              init_std=0.2)
    t5 = t.T5Config(vocab_size=512, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS,
                    num_heads=HEADS, initializer_factor=2.0, decoder_start_token_id=0)
    llama = t.LlamaConfig(vocab_size=512, hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=LAYERS,
                          num_attention_heads=HEADS, num_key_value_heads=HEADS // 2, max_position_embeddings=64,
                          tie_word_embeddings=True)  # grouped-query attention, a gated MLP, a tied head
    gpt2 = t.GPT2Config(vocab_size=512, n_embd=HIDDEN, n_layer=LAYERS, n_head=HEADS, n_positions=64,
                        initializer_range=0.2)
    seq2seq = {"encoder": "encoder_model.onnx", "decoder": "decoder_model.onnx",
               "merged decoder": "decoder_model_merged.onnx"}
    return {
        "BERT classifier": (t.BertForSequenceClassification(t.BertConfig(vocab_size=512, num_labels=3, **COMMON)),
                            "text-classification", {"": "model.onnx"}),
        "RoBERTa classifier": (t.RobertaForSequenceClassification(t.RobertaConfig(
            vocab_size=512, num_labels=3, max_position_embeddings=40, **COMMON)), "text-classification",
            {"": "model.onnx"}),
        "DistilBERT classifier": (t.DistilBertForSequenceClassification(t.DistilBertConfig(
            vocab_size=512, dim=HIDDEN, n_layers=LAYERS, n_heads=HEADS, hidden_dim=FFN, num_labels=3,
            initializer_range=0.2)), "text-classification", {"": "model.onnx"}),
        "ViT": (t.ViTForImageClassification(t.ViTConfig(image_size=32, patch_size=8, num_labels=5, **COMMON)),
                "image-classification", {"": "model.onnx"}),
        "DeiT": (t.DeiTForImageClassification(t.DeiTConfig(image_size=32, patch_size=8, num_labels=5, **COMMON)),
                 "image-classification", {"": "model.onnx"}),
        "Swin": (t.SwinForImageClassification(t.SwinConfig(
            image_size=32, patch_size=4, embed_dim=32, depths=[2, 2], num_heads=[2, 4], window_size=4, num_labels=5,
            initializer_range=0.2)), "image-classification", {"": "model.onnx"}),
        "CLIP vision": (t.CLIPVisionModel(t.CLIPVisionConfig(image_size=32, patch_size=8, **COMMON)),
                        "feature-extraction", {"": "model.onnx"}),
        "CLIP": (t.CLIPModel(t.CLIPConfig(text_config=dict(vocab_size=512, max_position_embeddings=16, **COMMON),
                                          vision_config=dict(image_size=32, patch_size=8, **COMMON),
                                          projection_dim=32)), "feature-extraction", {"": "model.onnx"}),
        "Whisper": (t.WhisperForConditionalGeneration(whisper), "automatic-speech-recognition-with-past", seq2seq),
        "Llama": (t.LlamaForCausalLM(llama), "text-generation", {"": "model.onnx"}),
        "Llama with past": (t.LlamaForCausalLM(llama), "text-generation-with-past", {"": "model.onnx"}),
        "GPT-2": (t.GPT2LMHeadModel(gpt2), "text-generation", {"": "model.onnx"}),
        "GPT-2 with past": (t.GPT2LMHeadModel(gpt2), "text-generation-with-past", {"": "model.onnx"}),
        "T5": (t.T5ForConditionalGeneration(t5), "text2text-generation-with-past", seq2seq),
    }


FIXTURES = {"BERT classifier": "bert_classifier.onnx", "CLIP": "clip.onnx", "CLIP vision": "clip_vision.onnx",
            "Swin": "swin.onnx", "T5 encoder": "t5_encoder.onnx", "T5 decoder": "t5_decoder.onnx",
            "Whisper decoder": "whisper_decoder.onnx", "T5 merged decoder": "t5_decoder_merged.onnx",
            "Llama": "llama.onnx", "Llama with past": "llama_with_past.onnx", "GPT-2": "gpt2.onnx",
            "GPT-2 with past": "gpt2_with_past.onnx"}
STRIPPED = 16  # float tensors of at least this many elements are zeroed in a fixture (scalars such as epsilons stay)


def strip_weights(source: Path, target: Path) -> None:
    """`source` with its float tensors of STRIPPED or more elements zeroed (git stores the zeros compressed)."""
    model = onnx.load(str(source))
    for tensor in model.graph.initializer:
        values = numpy_helper.to_array(tensor)
        if values.dtype.kind == "f" and values.size >= STRIPPED:
            tensor.CopyFrom(numpy_helper.from_array(np.zeros_like(values), tensor.name))
    onnx.save(model, str(target))


def main(out: Path, fixtures: Path | None) -> None:
    exports = {}
    for family, (model, task, files) in models().items():
        torch.manual_seed(0)
        folder = out / family.replace(" ", "_")
        model.save_pretrained(folder / "hf")
        try:
            main_export(str(folder / "hf"), output=str(folder / "onnx"), task=task, opset=17, do_validation=False)
        except Exception as exc:  # noqa: BLE001 — a family Optimum cannot export is a row of the table
            print(f"{family}: Optimum's export failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        for row, name in files.items():
            exports[f"{family} {row}".strip()] = {"model": str(folder / "onnx" / name), "family": family}
    (out / "exports.json").write_text(json.dumps(exports, indent=1))
    if fixtures is not None:
        fixtures.mkdir(parents=True, exist_ok=True)
        for row, name in FIXTURES.items():
            strip_weights(Path(exports[row]["model"]), fixtures / name)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--fixtures", type=Path)
    args = parser.parse_args()
    main(args.out, args.fixtures)
