"""Issue 26's table: every encoder family × exporter × cut, each cell what `lrdeploy build` did with it.

    .venv/bin/python benchmarks/tools/family_matrix.py OUT_DIR [--families vit,swin,...] [--exporters legacy,dynamo]

Each family is a small random-initialised Hugging Face model of `tests/families.py` (hidden 64, 2 blocks, seeded), wrapped to
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

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository: the families live in its tests
from tests.families import CUTS, export, family_models, run_cell  # noqa: E402
from tests.optimum_graphs import graph_inputs  # noqa: E402

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
            rows.append((row, "optimum", folder, model, graph_inputs(model, 24 if audio else 96, 0),
                         graph_inputs(model, 8 if audio else 32, 1)))
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
