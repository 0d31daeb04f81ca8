"""The sensitivity measurements of two lrdeploy trees side by side: the same layers of the same model measured at the
same ranks on the same probe windows by each tree's `measure_sensitivity`, rounds alternated so that both see the
same load. Layers are taken from the first and the last blocks (a measurement's cost depends on where its layer
is: from where its error acts, the work left is what the newer code runs).

    python benchmarks/tools/sensitivity_speed.py MODEL --calib C --before TREE --after TREE [--layers 12]
        [--samples 4] [--rounds 2] [--before-threads N] [--after-threads N] [--record NAME]

The same tree twice with --before-threads 1 (ONNX Runtime on one thread, as a one-CPU Ray task runs it) and the
default (all cores) gives the most two one-CPU Ray workers can gain here: t₁ / (2·t₀) of the serial stage.

TREE is a checkout of lrdeploy (a `git worktree add` of the commit to compare). Each run is its own process
(`python this-file --measure …` with that tree first on sys.path); with --record NAME the result goes to
benchmarks/results/sensitivity_speed_cpu/NAME.json, with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parents[1] / "results" / "sensitivity_speed_cpu"
FLOOR = 1e-6  # distortions below this are float noise (an LM's KL: float32 exponentials, ~1e-9 nats a position)


def measure(model_path: str, calib: str, layer_count: int, samples: int, threads: int) -> dict:
    """In this process (the tree under test first on sys.path): decompose the chosen layers from `samples`
    calibration windows and time their sensitivity measurement."""
    import numpy as np
    import onnx

    from lrdeploy.calib.data import SampleSet, iter_batches, model_input_specs
    from lrdeploy.calib.stats import TensorRequest, collect_moments
    from lrdeploy.lowrank.decompose import decompose
    from lrdeploy.stages.inspect import inspect_model
    from lrdeploy.stages.sensitivity import measure_sensitivity

    inspection = inspect_model(Path(model_path))
    eligible = [layer for layer in inspection.layers if layer.eligible]
    half = layer_count // 2
    layers = eligible[:half] + eligible[-(layer_count - half):]
    with np.load(calib, allow_pickle=False) as data:
        arrays = {name: data[name][:samples] for name in data.files}
    model = onnx.load(model_path)
    specs = model_input_specs(model)
    probe = list(iter_batches(SampleSet(arrays), specs, 1, "attention_mask"))
    moments = collect_moments(model, [TensorRequest(layer.input_name, layer.d_in) for layer in layers],
                              lambda: iter(probe), mask_name="attention_mask")
    decompositions = {layer.name: decompose("pca", layer.weight, layer.bias, moments[layer.input_name])
                      for layer in layers}
    start = time.perf_counter()
    table = measure_sensitivity(model, layers, decompositions, 16, probe, threads=threads, mask_name="attention_mask")
    seconds = time.perf_counter() - start
    return {"seconds": round(seconds, 2), "layers": [layer.name for layer in layers],
            "measurements": sum(len(ranks) for ranks in table.values()),
            "table": {name: {str(rank): loss for rank, loss in ranks.items()} for name, ranks in table.items()}}


def run_tree(tree: str, threads: int, args: argparse.Namespace) -> dict:
    env = {**os.environ, "PYTHONPATH": tree}
    output = subprocess.run([sys.executable, __file__, args.model, "--calib", args.calib, "--layers", str(args.layers),
                             "--samples", str(args.samples), "--threads", str(threads), "--measure"], env=env, cwd="/",
                            check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("--calib", required=True)
    parser.add_argument("--before")
    parser.add_argument("--after")
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--before-threads", type=int, default=0)
    parser.add_argument("--after-threads", type=int, default=0)
    parser.add_argument("--record", metavar="NAME")
    parser.add_argument("--threads", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.model, args.calib, args.layers, args.samples, args.threads)))
        return
    runs: dict[str, list[dict]] = {"before": [], "after": []}
    for _ in range(args.rounds):
        for which in ("before", "after"):
            runs[which].append(run_tree(getattr(args, which), getattr(args, f"{which}_threads"), args))
            print(which, runs[which][-1]["seconds"], "s", flush=True)
    before, after = runs["before"][-1]["table"], runs["after"][-1]["table"]
    differences = [abs(after[name][rank] - loss) / max(abs(loss), FLOOR)
                   for name, ranks in before.items() for rank, loss in ranks.items()]
    best = {which: min(run["seconds"] for run in done) for which, done in runs.items()}
    result = {"command": " ".join(["benchmarks/tools/sensitivity_speed.py", *sys.argv[1:]]),
              "layers": runs["after"][-1]["layers"], "measurements": runs["after"][-1]["measurements"],
              "seconds": {which: [run["seconds"] for run in done] for which, done in runs.items()},
              "ratio_best": round(best["after"] / best["before"], 3),
              "largest_difference_relative_or_over_1e-6": max(differences),
              "tables": {"before": before, "after": after}}
    print(json.dumps(result, indent=1))
    if args.record:
        RESULTS.mkdir(parents=True, exist_ok=True)
        (RESULTS / f"{args.record}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
