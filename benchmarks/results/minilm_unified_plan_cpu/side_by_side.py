"""Every model of this table timed side by side in one run (ORT CPU, bound runs alternated, median of 20).
Run: python side_by_side.py DENSE.onnx > side_by_side.json (from this folder, after run.sh)."""
import json
import sys

import numpy as np

from lrdeploy.bench.feeds import timing_feed
from lrdeploy.bench.measure import BenchSettings, time_shape
from lrdeploy.calib.data import model_input_specs
from lrdeploy.onnx_io import load_model
from lrdeploy.runtime.onnxruntime import OrtRunner

NAMES = ["lowrank_sens_p50", "unified_p50", "lowrank_t62_4096", "unified_t62_4096", "unified_t50_4096",
         "unified_t65_128"]
dense = sys.argv[1]
runners = [OrtRunner(dense, "cpu", 0, "dense")] + [OrtRunner(f"{n}/minilm.lowrank.onnx", "cpu", 0, n) for n in NAMES]
for runner in runners:
    runner.activate()
specs = model_input_specs(load_model(dense).proto)
result = {}
for batch in (1, 32):
    times = time_shape(runners, timing_feed(specs, batch, 128), BenchSettings(warmup=3, iterations=20))
    medians = {name: float(np.median(t)) for name, t in times.items()}
    result[f"{batch}x128"] = {"dense_ms": medians["dense"],
                              **{n: medians[n] / medians["dense"] for n in NAMES}}
print(json.dumps(result, indent=1))
