#!/usr/bin/env bash
# Issue 12's CPU goal: half the linear parameters or fewer, compressed inside ONNX Runtime's fused graph, the
# latency target held to the clock (each plan built and timed against dense, planned again on a miss), then
# benched with BOTH models through ORT's transformer optimizer, side by side.
set -u
ASSETS=${ASSETS:-/tmp/minilm}
OUT=${OUT:-$(dirname "$0")}
L=${LRDEPLOY:-lrdeploy}
/usr/bin/time -f "%e s" $L build $ASSETS/minilm.onnx --calib $ASSETS/calib.npz --eval $ASSETS/eval.npz \
  --optimize ort --plan unified --rank-budget 0.5 --target-latency 0.6 --tokens 4096 -o "$OUT/build" \
  2> "$OUT/build.log"   # the model itself (build/minilm.lowrank.onnx) is not committed
$L bench $ASSETS/minilm.onnx "$OUT/build/minilm.lowrank.onnx" --optimize ort --batch 1,8,32 --iterations 20 \
  --threads 2 -o "$OUT/bench"
$L bench $ASSETS/minilm.onnx "$OUT/build/minilm.lowrank.onnx" --optimize ort --batch 32 --iterations 40 \
  --threads 2 -o "$OUT/bench_b32_40it"
