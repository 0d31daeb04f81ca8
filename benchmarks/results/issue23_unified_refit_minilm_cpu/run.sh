#!/bin/bash
# MiniLM figures for issue 23 (run from the repo root)
set -x
D=/tmp/minilm-demo
L=.venv/bin/lrdeploy
/usr/bin/time -v $L sweep $D/minilm.onnx --calib $D/calib.npz --eval $D/eval.npz --budgets 0.9,0.7,0.5 --bench-batch 0 -o /tmp/runs/sweep > /tmp/runs/sweep.log 2>&1
/usr/bin/time -v $L build $D/minilm.onnx --calib $D/calib.npz --eval $D/eval.npz --plan unified --rank-budget 0.5 -o /tmp/runs/unified --json > /tmp/runs/unified.json 2> /tmp/runs/unified.err
/usr/bin/time -v $L build $D/minilm.onnx --calib $D/calib.npz --eval $D/eval.npz --plan unified --rank-budget 0.5 --refit -o /tmp/runs/unified_refit --json > /tmp/runs/unified_refit.json 2> /tmp/runs/unified_refit.err
