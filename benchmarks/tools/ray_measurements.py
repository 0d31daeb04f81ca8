"""The plan's measurements with and without Ray, side by side: `lrdeploy build` on MiniLM (the demo's model and
data), each configuration run here and with `--ray auto` (a local Ray of this machine's CPUs), alternated so that
both see the same load; each run's stage times from its report, and whether the two models are byte-identical.

    .venv/bin/python benchmarks/tools/ray_measurements.py --demo /tmp/minilm-demo --out /tmp/ray-bench [--record NAME]

--demo is a folder `lrdeploy demo -o` wrote (minilm.onnx, calib.npz, eval.npz). With --record NAME the result is
written to benchmarks/results/ray_measurements_minilm_cpu/NAME.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CONFIGURATIONS = {
    "sensitivity": ["--rank-budget", "0.5", "--plan", "lowrank", "--allocation", "sensitivity"],
    "unified": ["--rank-budget", "0.5"],
}


def built(demo: Path, out: Path, options: list[str]) -> dict[str, object]:
    """One build's wall time, stage times and model bytes."""
    command = [sys.executable, "-c", "from lrdeploy.cli import main; main()", "build", str(demo / "minilm.onnx"),
               "--calib", str(demo / "calib.npz"), "--eval", str(demo / "eval.npz"), "--no-cache", "-o", str(out),
               *options]
    start = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - start
    report = json.loads((out / "report.json").read_text())
    return {"wall_s": round(wall, 1), "timings": report["timings"],
            "model": (out / "minilm.lowrank.onnx").read_bytes()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--record", metavar="NAME")
    args = parser.parse_args()
    result: dict[str, object] = {"command": " ".join(["benchmarks/tools/ray_measurements.py", *sys.argv[1:]]),
                                 "builds": {}}
    for name, options in CONFIGURATIONS.items():
        runs: dict[str, list[dict[str, object]]] = {"here": [], "ray": []}
        for round_ in range(args.rounds):
            for where, extra in (("here", []), ("ray", ["--ray", "auto"])):
                runs[where].append(built(args.demo, args.out / f"{name}-{where}-{round_}", options + extra))
        stage = "sensitivity" if name == "sensitivity" else "shape options"
        best = {where: min(run["timings"][stage] for run in done) for where, done in runs.items()}
        result["builds"][name] = {
            "options": " ".join(options),
            "measured_stage": stage,
            "stage_s": {where: [run["timings"][stage] for run in done] for where, done in runs.items()},
            "ray_start_s": [run["timings"].get("ray start") for run in runs["ray"]],
            "wall_s": {where: [run["wall_s"] for run in done] for where, done in runs.items()},
            "stage_ratio_best": round(best["ray"] / best["here"], 3),
            "byte_identical": all(run["model"] == runs["here"][0]["model"] for done in runs.values() for run in done),
        }
        print(json.dumps(result["builds"][name], indent=2), flush=True)
    if args.record:
        folder = Path(__file__).resolve().parents[1] / "results" / "ray_measurements_minilm_cpu"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{args.record}.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
