"""ONNX Runtime CPU latency of a dense model against its compressed version, measured side by side.

    python bench/ort_latency.py DENSE.onnx COMPRESSED.onnx [--batch 32] [--seq 128] [--iterations 20]
        [--threads 2] [--json bench/results/NAME.json]

Both sessions are created first, warmed up, then timed alternately run by run (dense, compressed, dense,
…) so that a noisy shared machine slows both alike; the ratio of medians is the figure to quote. Feeds
are full-length (no padding) token ids for models with input_ids/attention_mask inputs, random floats
otherwise. The full `lrdeploy bench` command comes with the engines issue.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np


def make_feeds(session, batch: int, seq: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    feeds = {}
    for value in session.get_inputs():
        shape = [batch if i == 0 else (seq if not isinstance(d, int) else d) for i, d in enumerate(value.shape)]
        if "int" in value.type:
            feeds[value.name] = np.ones(shape, np.int64) if "mask" in value.name else rng.integers(1000, 20000, shape)
        else:
            feeds[value.name] = rng.standard_normal(shape).astype(np.float32)
    return feeds


def measure(dense: Path, compressed: Path, batch: int, seq: int, iterations: int, threads: int, warmup: int = 3) -> dict:
    import onnxruntime as ort

    from lrdeploy.runtime.onnxruntime import create_session

    sessions = {"dense": create_session(dense, threads), "compressed": create_session(compressed, threads)}
    feeds = make_feeds(sessions["dense"], batch, seq)
    times: dict[str, list[float]] = {name: [] for name in sessions}
    for _ in range(warmup):
        for session in sessions.values():
            session.run(None, feeds)
    for _ in range(iterations):
        for name, session in sessions.items():
            start = time.perf_counter()
            session.run(None, feeds)
            times[name].append((time.perf_counter() - start) * 1e3)
    summary = {
        name: {"mean_ms": float(np.mean(t)), "p50_ms": float(np.median(t)), "p90_ms": float(np.percentile(t, 90)),
               "min_ms": float(np.min(t))}
        for name, t in times.items()
    }
    return {
        "dense_model": str(dense), "compressed_model": str(compressed), "batch": batch, "seq": seq,
        "iterations": iterations, "threads": threads, "backend": "onnxruntime-cpu",
        "onnxruntime": ort.__version__, "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "latency": summary, "ratio_p50": summary["compressed"]["p50_ms"] / summary["dense"]["p50_ms"],
        "ratio_mean": summary["compressed"]["mean_ms"] / summary["dense"]["mean_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dense", type=Path)
    parser.add_argument("compressed", type=Path)
    parser.add_argument("--batch", type=int, nargs="+", default=[32])
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    results = []
    for batch in args.batch:
        result = measure(args.dense, args.compressed, batch, args.seq, args.iterations, args.threads)
        results.append(result)
        d, c = result["latency"]["dense"], result["latency"]["compressed"]
        print(f"batch {batch}×{args.seq}: dense p50 {d['p50_ms']:.1f} ms, compressed p50 {c['p50_ms']:.1f} ms, "
              f"ratio {result['ratio_p50']:.3f} (mean ratio {result['ratio_mean']:.3f})")
    if args.json:
        from lrdeploy.files import atomic_write_text

        args.json.parent.mkdir(parents=True, exist_ok=True)
        command = "python bench/ort_latency.py " + " ".join(
            [str(args.dense), str(args.compressed), "--batch", *map(str, args.batch), "--seq", str(args.seq),
             "--iterations", str(args.iterations), "--threads", str(args.threads)])
        atomic_write_text(args.json, json.dumps({"command": command, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
