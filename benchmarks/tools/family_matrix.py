"""Issue 26's table: every encoder family × exporter × cut, each cell what `lrdeploy build` did with it.

    .venv/bin/python benchmarks/tools/family_matrix.py OUT_DIR [--families vit,swin,...] [--exporters legacy,dynamo]

Each family is a small random-initialised Hugging Face model made here (hidden 64, 2 blocks, seeded), wrapped to
return one tensor (the last hidden state, or a classifier's logits), exported by torch's legacy exporter
(`dynamo=False`) and by its dynamo exporter (`dynamo=True`, a dynamic batch axis), checked against PyTorch in
ONNX Runtime, and given random calibration / held-out inputs. Then each cut is built with the CLI in-process;
a cell is `ok` (the build validated its output on held-out inputs in ONNX Runtime, and the written model's
matrices shrank by what the report claims: `stages/rewrite_check`), `Error: …` (one line, the build refused), or
`BUG: <exception>` (a traceback). Writes OUT_DIR/matrix.json and OUT_DIR/matrix.md. Optimum's exports are not
covered here (optimum-onnx pins transformers 4.57; see docs/export.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
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


def family_models():
    """{family: (a function making the torch model, a function making `count` inputs from a seed)}."""
    import transformers as t

    common = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS, intermediate_size=FFN,
                  initializer_range=0.2)
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
        "Whisper encoder": (lambda: t.WhisperModel(t.WhisperConfig(
            num_mel_bins=16, max_source_positions=32, d_model=HIDDEN, encoder_layers=LAYERS, decoder_layers=LAYERS,
            encoder_attention_heads=HEADS, decoder_attention_heads=HEADS, encoder_ffn_dim=FFN, decoder_ffn_dim=FFN,
            vocab_size=512, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
            init_std=0.2)).get_encoder(), _audio()),
        "T5 encoder": (lambda: t.T5EncoderModel(t.T5Config(
            vocab_size=512, d_model=HIDDEN, d_kv=HIDDEN // HEADS, d_ff=FFN, num_layers=LAYERS, num_heads=HEADS,
            initializer_factor=2.0)), _text()),
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


def optimum_inputs(model: Path, count: int, seed: int) -> dict[str, np.ndarray]:
    """Random inputs for an Optimum export, by its inputs' names and shapes: token ids, masks of ones, pixels,
    audio features, encoder states of 16 positions, an empty decoder past (prefill) and the encoder's past."""
    rng = np.random.default_rng(seed)
    inputs = {}
    for spec in onnx.load(str(model), load_external_data=False).graph.input:
        name = spec.name
        dims = [d.dim_value or None for d in spec.type.tensor_type.shape.dim]
        static = [count] + [d or 16 for d in dims[1:]]
        if name.endswith("ids"):
            inputs[name] = rng.integers(3, 512, (count, 16), dtype=np.int64)
            inputs[name] = inputs[name] if name != "token_type_ids" else np.zeros_like(inputs[name])
        elif name.endswith("mask"):
            inputs[name] = np.ones((count, 16), dtype=np.int64)
        elif name == "pixel_values":
            inputs[name] = rng.standard_normal((count, 3, 32, 32)).astype(np.float32)
        elif name.startswith("past_key_values") and name.split(".")[2] == "decoder":
            inputs[name] = np.zeros([count, dims[1], 0, dims[3]], np.float32)
        elif name == "use_cache_branch":
            inputs[name] = np.zeros([1], bool)
        else:
            inputs[name] = rng.standard_normal(static).astype(np.float32)
    return inputs


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


def main_(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", type=Path)
    parser.add_argument("--families")
    parser.add_argument("--exporters", default="legacy,dynamo", help="torch exporters (\"\" for none)")
    parser.add_argument("--cuts")
    parser.add_argument("--optimum", type=Path, help="optimum_exports.py's folder: its exports become rows too")
    args = parser.parse_args(argv)
    families = family_models()
    chosen = args.families.split(",") if args.families else list(families)
    cuts = {name: CUTS[name] for name in (args.cuts.split(",") if args.cuts else CUTS)}
    exporters = args.exporters.split(",") if args.exporters else []
    args.out.mkdir(parents=True, exist_ok=True)
    results: list[dict] = []
    rows = []  # (family, exporter, folder, model, calib, eval)
    for family in chosen:
        make_model, make_inputs = families[family]
        torch.manual_seed(0)
        model = make_model()
        calib, evaluation = make_inputs(96, 0), make_inputs(32, 1)
        for exporter in exporters:
            folder = args.out / family.replace(" ", "_") / exporter
            folder.mkdir(parents=True, exist_ok=True)
            try:
                export(model, calib, folder / "model.onnx", exporter)
            except Exception as exc:  # noqa: BLE001 — the exporter's own failure is a row, not a crash
                results.append({"family": family, "exporter": exporter, "cut": "export", "outcome": "export failed",
                                "detail": f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"})
                continue
            rows.append((family, exporter, folder, folder / "model.onnx", calib, evaluation))
    if args.optimum:
        for row, export_ in json.loads((args.optimum / "exports.json").read_text()).items():
            folder = args.out / row.replace(" ", "_") / "optimum"
            folder.mkdir(parents=True, exist_ok=True)
            model = Path(export_["model"])
            audio = "Whisper" in row  # 3000 frames: fewer samples
            rows.append((row, "optimum", folder, model, optimum_inputs(model, 24 if audio else 96, 0),
                         optimum_inputs(model, 8 if audio else 32, 1)))
    for family, exporter, folder, path, calib, evaluation in rows:
        np.savez(folder / "calib.npz", **calib)
        np.savez(folder / "eval.npz", **evaluation)
        matmuls = sum(node.op_type in ("MatMul", "Gemm") for node in onnx.load(str(path)).graph.node)
        for cut, options in cuts.items():
            start = time.perf_counter()
            outcome, detail = run_cell(path, folder / "calib.npz", folder / "eval.npz", options,
                                       folder / cut.replace(" ", "_"))
            results.append({"family": family, "exporter": exporter, "cut": cut, "outcome": outcome,
                            "detail": detail, "matmuls": matmuls, "seconds": round(time.perf_counter() - start, 1)})
            print(results[-1], flush=True)
    (args.out / "matrix.json").write_text(json.dumps(results, indent=1))
    lines = ["| model | exporter | " + " | ".join(cuts) + " |", "|---|---|" + "---|" * len(cuts)]
    for family, exporter in dict.fromkeys((r["family"], r["exporter"]) for r in results):
        cells = {r["cut"]: r for r in results if r["family"] == family and r["exporter"] == exporter}
        if "export" in cells:
            lines.append(f"| {family} | {exporter} | export failed: {cells['export']['detail']} |" + " |" * (len(cuts) - 1))
            continue
        row = [f"{'✓' if c['outcome'] == 'ok' else '✗' if c['outcome'] == 'error' else 'BUG'} {c['detail']}"
               .replace("|", "/") for c in (cells[cut] for cut in cuts)]
        lines.append(f"| {family} | {exporter} | " + " | ".join(row) + " |")
    (args.out / "matrix.md").write_text("\n".join(lines) + "\n")
    (args.out / "compact.md").write_text(compact_table(results, list(cuts)))
    print("\n".join(lines))


def compact_table(results: list[dict], cuts: list[str]) -> str:
    """The table for the docs: ✓ and the held-out figure (top-1 agreement or cosine), or ✗ and a footnote with the
    one Error line (its model path cut off), each distinct line once."""
    notes: dict[str, str] = {}
    lines = ["| model | exporter | " + " | ".join(cuts) + " |", "|---|---|" + "---|" * len(cuts)]
    for family, exporter in dict.fromkeys((r["family"], r["exporter"]) for r in results):
        cells = {r["cut"]: r for r in results if r["family"] == family and r["exporter"] == exporter}
        row = []
        for cut in cuts:
            cell = cells.get(cut) or cells.get("export")
            if cell["outcome"] == "ok":
                row.append("✓ " + cell["detail"].split(",")[0].split()[-1])
                continue
            text = cell["detail"].split(".onnx ", 1)[-1] if ".onnx " in cell["detail"] else cell["detail"]
            key = notes.setdefault(text, chr(ord("a") + len(notes)))
            row.append(f"{'✗' if cell['outcome'] == 'error' else 'BUG'} ({key})")
        lines.append(f"| {family} | {exporter} | " + " | ".join(row) + " |")
    lines += [""] + [f"({key}) {text}" for text, key in notes.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main_(sys.argv[1:])
