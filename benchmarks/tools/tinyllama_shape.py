"""A 1.1B-parameter decoder builds on this 24 GB machine: a random-initialised Llama of TinyLlama's shape (22 blocks,
hidden 2048, FFN 5632, 32 query / 4 key-value heads, vocabulary 32000, untied head), exported by lrdeploy's own
exporter (torch's legacy exporter, external data), then `lrdeploy build --rank-budget 0.7 --plan lowrank` on
random token windows, its wall time and its own peak RSS recorded.

    .venv/bin/python benchmarks/tools/tinyllama_shape.py --out /tmp/tinyllama [--record NAME]

Writes OUT/tinyllama.onnx (+ its external data), OUT/build/ and, with --record NAME,
benchmarks/results/tinyllama_shape_cpu/NAME.json. The export runs in a process of its own (a child inherits its
parent's peak RSS). Not run in CI: it needs half an hour and ~15 GB for the export.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048, tie_word_embeddings=False)


def export(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from lrdeploy.export.torch_onnx import export_causal_lm

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SHAPE)).eval()
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters", flush=True)
    export_causal_lm(model, out / "tinyllama.onnx", "text-generation")


def write_windows(out: Path) -> None:
    """Random token windows, every position real (a random attention mask would leave 5632-wide inputs fewer
    positions than their width): 64 × 128 for calibration, 8 held out."""
    import numpy as np

    rng = np.random.default_rng(0)
    for name, count in (("calib", 64), ("eval", 8)):
        np.savez(out / f"{name}.npz", input_ids=rng.integers(0, SHAPE["vocab_size"], (count, 128)),
                 attention_mask=np.ones((count, 128), np.int64))


def measured(command: list[str]) -> tuple[int, float, float, str]:
    """(exit code, wall seconds, the child's own peak RSS in GiB, its stderr's tail)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        _, status, usage = os.wait4(child.pid, 0)
        stderr.seek(0)
        tail = stderr.read()[-2000:]
    return os.waitstatus_to_exitcode(status), time.perf_counter() - start, usage.ru_maxrss / 2**20, tail


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--record", metavar="NAME")
    parser.add_argument("--export-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.export_only:
        export(args.out)
        return
    result: dict[str, object] = {}
    if not (args.out / "tinyllama.onnx").exists():
        code, wall, peak, tail = measured([sys.executable, __file__, "--out", str(args.out), "--export-only"])
        result["export"] = {"exit_code": code, "wall_s": round(wall, 1), "peak_rss_gib": round(peak, 2), "stderr_tail": tail}
        if code:
            print(json.dumps(result, indent=2))
            sys.exit(code)
    from lrdeploy.onnx_io import model_files

    weights = sum(p.stat().st_size for p in model_files(args.out / "tinyllama.onnx")[1:])  # its external data
    write_windows(args.out)
    command = ["lrdeploy", "build", str(args.out / "tinyllama.onnx"), "--calib", str(args.out / "calib.npz"),
               "--eval", str(args.out / "eval.npz"), "--rank-budget", "0.7", "--plan", "lowrank", "--no-cache", "-o",
               str(args.out / "build")]
    code, wall, peak, tail = measured([sys.executable, "-c", "from lrdeploy.cli import main; main()", *command[1:]])
    result.update({"command": " ".join(command), "weight_gib": round(weights / 2**30, 3), "exit_code": code,
                   "build_wall_s": round(wall, 1), "build_peak_rss_gib": round(peak, 2),
                   "peak_limit_gib": round(1.5 * weights / 2**30 + 1, 2), "stderr_tail": tail})
    report = args.out / "build" / "report.json"
    if report.exists():
        data = json.loads(report.read_text())
        result.update({"timings": data["timings"], "peak_rss_mb": data["peak_rss_mb"],
                       "linear_ratio": data["params"]["linear_ratio"],
                       "logits": data["accuracy"]["outputs"]["logits"].get("next_token")})
    print(json.dumps(result, indent=2))
    if args.record:
        folder = Path(__file__).resolve().parents[1] / "results" / "tinyllama_shape_cpu"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.record}.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(code)


if __name__ == "__main__":
    main()
