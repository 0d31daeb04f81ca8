#!/bin/bash
# Issue 11's acceptance figures: the same MiniLM builds on a checkout SRC, results under OUT, fresh cache.
#   git worktree add /tmp/base 2354537 && bash run.sh /tmp/base /tmp/minilm_base     # before
#   bash run.sh "$PWD" /tmp/minilm_new                                                 # after
set -e
SRC=$1; OUT=$2; DATA=${DATA:-/tmp/minilm}; PY=${PYTHON:-python}
export PYTHONPATH=$SRC
cd "$SRC"
if [ ! -f "$DATA/minilm.onnx" ]; then
  $PY -c "
from pathlib import Path
from lrdeploy.commands.demo import DemoSettings, prepare_assets
from lrdeploy.progress import StageTimer
prepare_assets(DemoSettings(Path('$DATA')), StageTimer())"
fi
LR="$PY -c 'import lrdeploy.cli as c; c.main()'"
eval $LR sweep $DATA/minilm.onnx --calib $DATA/calib.npz --eval $DATA/eval.npz --budgets 0.9,0.7,0.5 --bench-batch 0 --cache-dir $OUT/cache -o $OUT/sweep
eval $LR build $DATA/minilm.onnx --calib $DATA/calib.npz --eval $DATA/eval.npz --rank-budget 0.5 --allocation sensitivity --cache-dir $OUT/cache -o $OUT/sens
eval $LR build $DATA/minilm.onnx --calib $DATA/calib.npz --eval $DATA/eval.npz --rank-budget 0.5 --refit --cache-dir $OUT/cache -o $OUT/refit
