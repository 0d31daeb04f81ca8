#!/bin/bash
# MiniLM: refit after a dropped block and after a unified plan that splits (issue 23)
set -x
D=/tmp/minilm-demo
L=.venv/bin/lrdeploy
for opts in "--drop-blocks 1 --rank-budget 1" "--drop-blocks 1 --rank-budget 1 --refit" "--plan unified --rank-budget 0.35" "--plan unified --rank-budget 0.35 --refit"; do
  name=$(echo $opts | tr -d '-' | tr ' ' '_')
  /usr/bin/time -v $L build $D/minilm.onnx --calib $D/calib.npz --eval $D/eval.npz $opts -o /tmp/runs/$name --json > /tmp/runs/$name.json 2> /tmp/runs/$name.err
done
