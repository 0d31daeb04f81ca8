"""distill(student, teacher, ...): recover a compressed model's accuracy without labels by making it mimic
the original's outputs (1 − cosine + MSE on the final output), with AdamW and a warm-up + cosine schedule.

Teacher outputs are computed once. The held-out check runs after every pass over the training batches
(and at the end); the student ends with the weights of its best check.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

Batch = Mapping[str, torch.Tensor]


@dataclass
class DistillConfig:
    steps: int = 1000
    lr: float = 5e-5
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    mse_weight: float = 1.0
    eval_every: int | None = None  # default: once per pass over the training batches


@dataclass
class DistillResult:
    best_cosine: float
    initial_cosine: float
    best_step: int
    history: list[dict] = field(default_factory=list)


def mimic_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, mse_weight: float) -> torch.Tensor:
    """Mean (1 − cosine) per sample plus `mse_weight` × mean squared error."""
    s = student_out.reshape(student_out.shape[0], -1)
    t = teacher_out.reshape(teacher_out.shape[0], -1)
    cosine = torch.nn.functional.cosine_similarity(s, t, dim=1)
    return (1 - cosine).mean() + mse_weight * torch.nn.functional.mse_loss(s, t)


@torch.no_grad()
def _outputs(model: torch.nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    model.eval()
    return [model(**batch).detach() for batch in batches]


@torch.no_grad()
def mean_cosine(model: torch.nn.Module, batches: Sequence[Batch], targets: Sequence[torch.Tensor]) -> float:
    total, count = 0.0, 0
    for output, target in zip(_outputs(model, batches), targets):
        cos = torch.nn.functional.cosine_similarity(output.reshape(output.shape[0], -1),
                                                    target.reshape(target.shape[0], -1), dim=1)
        total += float(cos.sum())
        count += cos.shape[0]
    return total / max(count, 1)


def distill(student: torch.nn.Module, teacher: torch.nn.Module, train_batches: Sequence[Batch],
            eval_batches: Sequence[Batch], config: DistillConfig,
            on_step: Callable[[int, float], None] | None = None,
            on_eval: Callable[[int, float], None] | None = None) -> DistillResult:
    """Train `student` (in place) toward `teacher`'s outputs; returns the held-out cosine history."""
    train_targets = _outputs(teacher, train_batches)
    eval_targets = _outputs(teacher, eval_batches)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    warmup = max(1, int(config.warmup_fraction * config.steps))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, config.steps) / config.steps)))
    eval_every = config.eval_every or len(train_batches)
    best = initial = mean_cosine(student, eval_batches, eval_targets)
    best_state, best_step = copy.deepcopy(student.state_dict()), 0
    result = DistillResult(best, initial, 0, [{"step": 0, "eval_cosine": initial}])
    for step in range(1, config.steps + 1):
        student.train()
        index = (step - 1) % len(train_batches)
        loss = mimic_loss(student(**train_batches[index]), train_targets[index], config.mse_weight)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss = loss.detach()
        if on_step is not None:
            on_step(step, float(loss))
        if step % eval_every == 0 or step == config.steps:
            cosine = mean_cosine(student, eval_batches, eval_targets)
            result.history.append({"step": step, "train_loss": float(loss), "eval_cosine": cosine})
            if on_eval is not None:
                on_eval(step, cosine)
            if cosine > best:
                best, best_step, best_state = cosine, step, copy.deepcopy(student.state_dict())
    student.load_state_dict(best_state)
    student.eval()
    result.best_cosine, result.best_step = best, best_step
    return result
