#!/usr/bin/env bash
# Issue 13: low-rank only against structured only against the unified plan, at equal parameters and at equal
# measured latency. MiniLM with the demo's data (make demo, or lrdeploy.commands.demo.prepare_assets) in $ASSETS.
# Every build benches dense against compressed side by side (ORT CPU, --bench: batches 1, 8, 32 × 128).
set -u
ASSETS=${ASSETS:-/tmp/minilm}
OUT=${OUT:-$(dirname "$0")}
L=${LRDEPLOY:-lrdeploy}
common="$ASSETS/minilm.onnx --calib $ASSETS/calib.npz --eval $ASSETS/eval.npz --bench --json"
run() { name=$1; shift; echo "== $name: $L build $*"; /usr/bin/time -f "%e s" $L build $common "$@" -o "$OUT/$name" > "$OUT/$name.json" 2> "$OUT/$name.log"; tail -3 "$OUT/$name.log"; }
run lowrank_sens_p50       --allocation sensitivity --rank-budget 0.5
run unified_p50            --plan unified --rank-budget 0.5
run unified_t62_4096       --plan unified --target-latency 0.62 --tokens 4096
run unified_t50_4096       --plan unified --target-latency 0.5 --tokens 4096
run unified_t65_128        --plan unified --target-latency 0.65 --tokens 128
run lowrank_t62_4096       --plan lowrank --target-latency 0.62 --tokens 4096
