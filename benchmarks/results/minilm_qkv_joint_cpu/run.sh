#!/usr/bin/env bash
# Issue 12: --qkv joint (one low-rank basis for Q|K|V) against separate bases at the same budget on MiniLM,
# the demo's data in $ASSETS (lrdeploy.commands.demo.prepare_assets). Then one side-by-side bench of all three.
set -u
ASSETS=${ASSETS:-/tmp/minilm}
OUT=${OUT:-$(dirname "$0")}
L=${LRDEPLOY:-lrdeploy}
common="$ASSETS/minilm.onnx --calib $ASSETS/calib.npz --eval $ASSETS/eval.npz --allocation sensitivity --json"
for qkv in separate joint; do
  for budget in 0.5 0.7; do
    name=${qkv}_p${budget#0.}
    /usr/bin/time -f "%e s" $L build $common --rank-budget $budget --qkv $qkv -o "$OUT/$name" > "$OUT/$name.json" 2> "$OUT/$name.log"
    tail -1 "$OUT/$name.log"
  done
done
# bench compares two models side by side: joint against separate, then dense against joint
$L bench "$OUT"/separate_p5/minilm.lowrank.onnx "$OUT"/joint_p5/minilm.lowrank.onnx --batch 1,32 --iterations 20 \
  --threads 2 -o "$OUT/bench_separate_vs_joint_p5"
$L bench $ASSETS/minilm.onnx "$OUT"/joint_p5/minilm.lowrank.onnx --batch 1,32 --iterations 20 --threads 2 \
  -o "$OUT/bench_dense_vs_joint_p5"
