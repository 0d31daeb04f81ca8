"""A model over 2 GB builds: a synthetic stack of 4096×4096 MatMul+Add layers (FP32 weights in external data,
more than protobuf's 2 GB limit), compressed with `lrdeploy build --calib random`; time and peak RSS recorded.

    python benchmarks/tools/large_model.py --layers 34 --out /tmp/large    # ≈2.3 GB of weights
    python benchmarks/tools/large_model.py --layers 2 --out /tmp/small     # seconds: checks the script works

Writes OUT/big.onnx (+ big.onnx.data), OUT/build/ (the compressed model, its external data, reports) and
benchmarks/results/large_model_cpu/NAME.json (with --record NAME) holding the command, wall time, peak RSS and
sizes. The low-rank plan (`--plan lowrank`) is timed: the build whose memory is bounded by one group of layers,
and the plan the recorded baseline (611 s, 17.1 GiB) ran before the unified plan became the default. Not run in
CI: it needs minutes and several GB of memory.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import tempfile
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

WIDTH = 4096


def write_model(path: Path, layers: int, width: int = WIDTH, seed: int = 0) -> int:
    """A [batch, seq, width] → [batch, seq, width] stack of `layers` MatMul+Add layers; returns weight bytes."""
    rng = np.random.default_rng(seed)
    nodes, inits, x = [], [], "x"
    for i in range(layers):
        w = (rng.standard_normal((width, width), dtype=np.float32) / np.sqrt(width)).astype(np.float32)
        inits += [numpy_helper.from_array(w, f"layer{i}.weight"),
                  numpy_helper.from_array(np.zeros(width, np.float32), f"layer{i}.bias")]
        nodes += [helper.make_node("MatMul", [x, f"layer{i}.weight"], [f"layer{i}/mm"], name=f"layer{i}/MatMul"),
                  helper.make_node("Add", [f"layer{i}/mm", f"layer{i}.bias"], [f"layer{i}/out"], name=f"layer{i}/Add")]
        x = f"layer{i}/out"
    nodes.append(helper.make_node("Identity", [x], ["y"], name="output"))
    graph = helper.make_graph(nodes, "big", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", width])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (path.parent / f"{path.name}.data").unlink(missing_ok=True)  # onnx appends to an existing data file
    onnx.save_model(model, str(path), save_as_external_data=True, location=f"{path.name}.data", size_threshold=1024)
    return layers * (width * width + width) * 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=34)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--calib-samples", type=int, default=40)
    parser.add_argument("--record", metavar="NAME", help="write benchmarks/results/large_model_cpu/NAME.json")
    parser.add_argument("--generate-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    model = args.out / "big.onnx"
    if args.generate_only:
        write_model(model, args.layers)
        return
    # generated in a process of its own: a child inherits its parent's peak RSS, which would count the generation
    start = time.perf_counter()
    subprocess.run([sys.executable, __file__, "--layers", str(args.layers), "--out", str(args.out), "--generate-only"],
                   check=True)
    weight_bytes = args.layers * (WIDTH * WIDTH + WIDTH) * 4
    generated = time.perf_counter() - start
    command = ["lrdeploy", "build", str(model), "--calib", "random", "--shape", f"x:1x128x{WIDTH}", "--calib-samples",
               str(args.calib_samples), "--eval-samples", "4", "--rank-budget", "0.5", "--plan", "lowrank", "--no-cache", "-o",
               str(args.out / "build")]
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stderr:
        build = subprocess.Popen([sys.executable, "-c", "from lrdeploy.cli import main; main()", *command[1:]],
                                 stdout=subprocess.DEVNULL, stderr=stderr, text=True)
        _, status, usage = os.wait4(build.pid, 0)  # this child's own peak RSS, not the generator's
        build.returncode = os.waitstatus_to_exitcode(status)
        stderr.seek(0)
        stderr_text = stderr.read()
    wall = time.perf_counter() - start
    peak_kib = usage.ru_maxrss
    outputs = sorted(p.name for p in (args.out / "build").iterdir()) if (args.out / "build").exists() else []
    result = {
        "command": " ".join(command), "layers": args.layers, "weight_gib": round(weight_bytes / 2**30, 3),
        "exit_code": build.returncode, "build_wall_s": round(wall, 1), "build_peak_rss_gib": round(peak_kib / 2**20, 2),
        "model_generation_s": round(generated, 1), "outputs": outputs,
        "output_data_gib": round((args.out / "build" / "big.lowrank.onnx.data").stat().st_size / 2**30, 3)
        if "big.lowrank.onnx.data" in outputs else None,
        "stderr_tail": stderr_text[-2000:],
    }
    print(json.dumps(result, indent=2))
    if args.record:
        folder = Path(__file__).resolve().parents[1] / "results" / "large_model_cpu"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.record}.json").write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(build.returncode)


if __name__ == "__main__":
    main()
