#!/usr/bin/env bash
# The unified plan inside ONNX Runtime's fused graph now that heads and blocks can be cut there too (issue 13,
# item 1): the same command as ../minilm_ort_cpu_optimized_unified_t60_checked/ (FFN widths and splits only
# then), held to the clock at 32×128, and again with --check-tokens 128 (batch 1 held too); both models through
# ORT's transformer optimizer in the bench, side by side.
set -u
ASSETS=${ASSETS:-/tmp/minilm}
OUT=${OUT:-$(dirname "$0")}
L=${LRDEPLOY:-lrdeploy}
for CHECK in "" "--check-tokens 128"; do
  NAME=build${CHECK:+_check128}
  /usr/bin/time -f "%e s" $L build $ASSETS/minilm.onnx --calib $ASSETS/calib.npz --eval $ASSETS/eval.npz \
    --optimize ort --plan unified --target-latency 0.6 --tokens 4096 $CHECK -o "$OUT/$NAME" \
    2> "$OUT/$NAME.log"   # the models themselves are not committed
  $L bench $ASSETS/minilm.onnx "$OUT/$NAME/minilm.lowrank.onnx" --optimize ort --batch 1,32 --iterations 20 \
    --threads 2 -o "$OUT/${NAME}_bench"
  $L bench $ASSETS/minilm.onnx "$OUT/$NAME/minilm.lowrank.onnx" --optimize ort --batch 1 --iterations 300 \
    --threads 2 -o "$OUT/${NAME}_bench_b1_300it"
done
