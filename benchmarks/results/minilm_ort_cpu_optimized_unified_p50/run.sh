#!/usr/bin/env bash
# Issue 12's CPU goal with the unified plan: half the linear parameters (--rank-budget 0.5), compressed inside
# ONNX Runtime's fused graph, then benched with BOTH models through ORT's transformer optimizer, side by side.
set -u
ASSETS=${ASSETS:-/tmp/minilm}
OUT=${OUT:-$(dirname "$0")}
L=${LRDEPLOY:-lrdeploy}
/usr/bin/time -f "%e s" $L build $ASSETS/minilm.onnx --calib $ASSETS/calib.npz --eval $ASSETS/eval.npz \
  --optimize ort --plan unified --rank-budget 0.5 --json -o "$OUT/build" > "$OUT/build.json" 2> "$OUT/build.log"
$L bench $ASSETS/minilm.onnx "$OUT/build/minilm.lowrank.onnx" --optimize ort --batch 1,8,32 --iterations 20 \
  --threads 2 -o "$OUT/bench"
# the same plan under a latency target instead of the parameter budget (timed on the fused graph)
/usr/bin/time -f "%e s" $L build $ASSETS/minilm.onnx --calib $ASSETS/calib.npz --eval $ASSETS/eval.npz \
  --optimize ort --plan unified --target-latency 0.58 --tokens 4096 --json -o "$OUT/build_t58" > "$OUT/build_t58.json" 2> "$OUT/build_t58.log"
$L bench $ASSETS/minilm.onnx "$OUT/build_t58/minilm.lowrank.onnx" --optimize ort --batch 1,8,32 --iterations 20 \
  --threads 2 -o "$OUT/bench_t58"
