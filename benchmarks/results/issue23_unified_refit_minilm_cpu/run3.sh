#!/bin/bash
cd "$(dirname "$0")/../../.."  # the repository
D=/tmp/minilm-demo
L=.venv/bin/lrdeploy
/usr/bin/time -v $L demo -o $D > /tmp/runs/demo.log 2>&1
/usr/bin/time -v $L sweep $D/minilm.onnx --calib $D/calib.npz --eval $D/eval.npz --budgets 0.9,0.7,0.5 --plan lowrank --bench-batch 0 -o /tmp/runs/sweep > /tmp/runs/sweep.log 2>&1
/usr/bin/time -v $L build $D/minilm.onnx --calib $D/calib.npz --eval $D/eval.npz --plan unified --rank-budget 0.5 -o /tmp/runs/unified --json > /tmp/runs/unified.json 2> /tmp/runs/unified.err
/usr/bin/time -v $L build $D/minilm.onnx --calib $D/calib.npz --eval $D/eval.npz --plan unified --rank-budget 0.5 --refit -o /tmp/runs/unified_refit --json > /tmp/runs/unified_refit.json 2> /tmp/runs/unified_refit.err
echo done > /tmp/runs/done
