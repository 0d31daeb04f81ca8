"""distill(student, teacher, ...): recover a compressed model's accuracy without labels by making it mimic
the original on its final output (an `Objective`: (1 − cosine) + MSE for an embedding, KL(teacher ‖ student)
of the next-token distributions for a causal LM's logits) and, optionally, a per-block hidden-state loss.
AdamW, warm-up + cosine schedule, batches reshuffled every pass.

The held-out check (the objective's metric: cosine, or next-token KL) runs every `eval_every` steps (and at the
end); the student ends with the weights of its best check. Dropout stays off by default: the teacher is deterministic, and noise in the student only blurs
the target it has to copy. Embedding tables are trained too by default; `freeze_embeddings` saves their dense
gradients and AdamW updates (MiniLM: 11.7 M of 22.7 M parameters, ~25% of a step) but, measured on MiniLM at
ρ=0.5, costs accuracy (check cosine 0.943 against 0.956 after 600 steps).

The hidden-state loss compares the outputs of matching blocks (e.g. each transformer layer) token by token,
padding excluded, each hidden dimension scaled by the teacher's spread of it over the batch: BERT-like models
have a few dimensions with huge activations that would otherwise drown the rest. The teacher's outputs and block
outputs are computed once before training and kept (block outputs in float16, up to TEACHER_STATES_LIMIT bytes):
the teacher is fixed, and running it every step cost about a third of each step. A causal LM's logits are too
big to keep (batch × tokens × vocabulary: 200 MB per batch of 4 × 128 tokens over SmolLM2's 49,152 words), so
its teacher runs every step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from lrdeploy.torch.distill_config import DistillConfig

Batch = Mapping[str, torch.Tensor]
TEACHER_STATES_LIMIT = 6 * 2**30  # bytes of the teacher's block outputs kept for training (float16)


@dataclass
class DistillResult:
    """The check metric (`metric`, "cosine" or "kl") before training and at the kept checkpoint, and its history
    [{step, check, train_loss?}]."""

    metric: str
    best: float
    initial: float
    best_step: int
    history: list[dict] = field(default_factory=list)


def mimic_loss(student_out: torch.Tensor, teacher_out: torch.Tensor, mse_weight: float) -> torch.Tensor:
    """Mean (1 − cosine) per sample plus `mse_weight` × mean squared error."""
    s = student_out.reshape(student_out.shape[0], -1)
    t = teacher_out.reshape(teacher_out.shape[0], -1)
    cosine = torch.nn.functional.cosine_similarity(s, t, dim=1)
    return (1 - cosine).mean() + mse_weight * torch.nn.functional.mse_loss(s, t)


def next_token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """(sum, count) of KL(teacher ‖ student) of the next-token distributions over the real positions (`mask`
    [batch, seq], 1 = real; logits [batch, seq, vocabulary]), computed in float32 from log-softmaxes."""
    student_log = torch.log_softmax(student_logits.float(), dim=-1)
    teacher_log = torch.log_softmax(teacher_logits.float(), dim=-1)
    per_position = (teacher_log.exp() * (teacher_log - student_log)).sum(-1)
    if mask is not None and mask.shape == per_position.shape:
        keep = mask.bool()
        return per_position[keep].sum(), int(keep.sum())
    return per_position.sum(), per_position.numel()


@dataclass(frozen=True)
class Objective:
    """What the student copies of the teacher's final output: `loss` (to minimise) and the check `metric` the best
    checkpoint is picked by, summed per sample or position by `check_sum` (→ (sum, count)); `store_targets`: the
    teacher's outputs are small enough to compute once and keep."""

    metric: str
    higher_is_better: bool
    store_targets: bool

    def loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, mask: torch.Tensor | None,
             config: DistillConfig) -> torch.Tensor:
        if self.metric == "kl":
            total, count = next_token_kl(student_out, teacher_out, mask)
            return total / max(count, 1)
        return mimic_loss(student_out, teacher_out, config.mse_weight)

    def check_sum(self, student_out: torch.Tensor, teacher_out: torch.Tensor,
                  mask: torch.Tensor | None) -> tuple[float, int]:
        if self.metric == "kl":
            total, count = next_token_kl(student_out, teacher_out, mask)
            return float(total), count
        cosine = torch.nn.functional.cosine_similarity(student_out.reshape(student_out.shape[0], -1),
                                                       teacher_out.reshape(teacher_out.shape[0], -1), dim=1)
        return float(cosine.sum()), cosine.shape[0]

    def better(self, value: float, than: float) -> bool:
        return value > than if self.higher_is_better else value < than


EMBEDDING = Objective("cosine", higher_is_better=True, store_targets=True)  # sentence embeddings, hidden states
NEXT_TOKEN = Objective("kl", higher_is_better=False, store_targets=False)  # a causal LM's logits


def hidden_state_loss(student_states: Sequence[torch.Tensor], teacher_states: Sequence[torch.Tensor],
                      mask: torch.Tensor | None) -> torch.Tensor:
    """Mean over blocks of the squared error per real token and hidden dimension, each dimension divided by
    the teacher's variance of it over the batch's real tokens (`mask` [batch, seq], 1 = real)."""
    losses = []
    for s, t in zip(student_states, teacher_states):
        s, t = s.reshape(-1, s.shape[-1]), t.reshape(-1, t.shape[-1])
        if mask is not None and mask.numel() == s.shape[0]:
            keep = mask.reshape(-1).bool()
            s, t = s[keep], t[keep]
        scale = t.var(0, unbiased=False).clamp_min(1e-6)
        losses.append(((s - t) ** 2 / scale).mean())
    return torch.stack(losses).mean()


def transformer_blocks(model: torch.nn.Module) -> list[str]:
    """Names of the children of the model's longest nn.ModuleList (the stack of transformer layers)."""
    lists = [(name, module) for name, module in model.named_modules() if isinstance(module, torch.nn.ModuleList)]
    if not lists:
        return []
    name, blocks = max(lists, key=lambda item: len(item[1]))
    return [f"{name}.{index}" for index in range(len(blocks))]


class BlockOutputs:
    """Forward hooks that record the output (its first element, for tuples) of named submodules."""

    def __init__(self, model: torch.nn.Module, names: Sequence[str]):
        modules = dict(model.named_modules())
        missing = [name for name in names if name not in modules]
        if missing:
            raise ValueError(f"no submodule named {missing[0]!r}")
        self.names = list(names)
        self.values: dict[str, torch.Tensor] = {}
        self.handles = [modules[name].register_forward_hook(self._recorder(name)) for name in names]

    def _recorder(self, name: str):
        def record(module, inputs, output):
            self.values[name] = output[0] if isinstance(output, (tuple, list)) else output
        return record

    def take(self) -> list[torch.Tensor]:
        values = [self.values[name] for name in self.names]
        self.values.clear()
        return values

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()


@torch.no_grad()
def _outputs(model: torch.nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    model.eval()
    return [model(**batch).detach() for batch in batches]


@dataclass
class TeacherTargets:
    """What the student is trained toward, per training batch: the teacher's outputs and, when stored, its block
    outputs (float16). None: not stored, the teacher runs every step."""

    outputs: list[torch.Tensor] | None
    states: list[list[torch.Tensor]] | None


@torch.no_grad()
def teacher_targets(teacher: torch.nn.Module, batches: Sequence[Batch], blocks: BlockOutputs | None,
                    objective: Objective = EMBEDDING) -> TeacherTargets:
    """The teacher's outputs for `batches` and, with `blocks` (hooks on the teacher), its block outputs in float16,
    so that training need not run the teacher every step (on MiniLM that forward is about a third of a step).
    The block outputs are dropped (None) once they pass TEACHER_STATES_LIMIT bytes: the teacher then runs every
    step instead. Nothing is kept where the objective's targets are too big to store (a causal LM's logits)."""
    if not objective.store_targets:
        return TeacherTargets(None, None)
    teacher.eval()
    outputs, states, stored = [], [] if blocks is not None else None, 0
    for batch in batches:
        outputs.append(teacher(**batch).detach())
        taken = blocks.take() if blocks is not None else []
        if states is not None:
            states.append([state.detach().to(torch.float16) for state in taken])
            stored += sum(state.numel() * state.element_size() for state in states[-1])
            if stored > TEACHER_STATES_LIMIT:
                states = None
    return TeacherTargets(outputs, states)


@torch.no_grad()
def check_score(model: torch.nn.Module, teacher: torch.nn.Module, batches: Sequence[Batch],
                targets: Sequence[torch.Tensor] | None, objective: Objective, mask_key: str) -> float:
    """The objective's metric of `model` against the teacher on `batches`, averaged per sample (cosine) or per
    real position (KL); the teacher runs here when its outputs (`targets`) are not stored."""
    model.eval()
    total, count = 0.0, 0
    for index, batch in enumerate(batches):
        target = targets[index] if targets is not None else teacher(**batch)
        part, n = objective.check_sum(model(**batch), target, batch.get(mask_key))
        total, count = total + part, count + n
    return total / max(count, 1)


def _schedule(optimizer: torch.optim.Optimizer, config: DistillConfig) -> torch.optim.lr_scheduler.LambdaLR:
    warmup = max(1, int(config.warmup_fraction * config.steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / warmup) * 0.5 * (
        1 + math.cos(math.pi * min(step, config.steps) / config.steps)))


def _batch_order(count: int, steps: int, seed: int) -> list[int]:
    """Batch index per step: a fresh permutation of all batches for every pass."""
    generator = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps:
        order.extend(torch.randperm(count, generator=generator).tolist())
    return order[:steps]


def distill(student: torch.nn.Module, teacher: torch.nn.Module, train_batches: Sequence[Batch],
            eval_batches: Sequence[Batch], config: DistillConfig, hidden_modules: Sequence[str | tuple[str, str]] = (),
            mask_key: str = "attention_mask", on_step: Callable[[int, float], None] | None = None,
            on_eval: Callable[[int, float], None] | None = None, objective: Objective = EMBEDDING) -> DistillResult:
    """Train `student` (in place) toward `teacher` on `objective`; returns the held-out check history.

    `hidden_modules` names submodules present in both models (e.g. `transformer_blocks(teacher)`), or pairs
    (student's, teacher's) where they differ (a student with blocks removed), whose outputs are matched when
    `config.hidden_weight` > 0; the teacher's are computed once with its outputs (`teacher_targets`).
    """
    use_hidden = config.hidden_weight > 0 and bool(hidden_modules)
    pairs = [(name, name) if isinstance(name, str) else name for name in hidden_modules]
    student_blocks = BlockOutputs(student, [mine for mine, _ in pairs]) if use_hidden else None
    teacher_blocks = BlockOutputs(teacher, [theirs for _, theirs in pairs]) if use_hidden else None
    try:
        targets = teacher_targets(teacher, train_batches, teacher_blocks, objective)
        hooks = (student_blocks, teacher_blocks) if use_hidden else None
        return _train(student, teacher, (train_batches, eval_batches), config, targets, hooks,
                      (objective, mask_key), on_step, on_eval)
    finally:
        for blocks in (student_blocks, teacher_blocks):
            if blocks is not None:
                blocks.close()


def _train(student: torch.nn.Module, teacher: torch.nn.Module, batches: tuple[Sequence[Batch], Sequence[Batch]],
           config: DistillConfig, targets: TeacherTargets, hooks: tuple[BlockOutputs, BlockOutputs] | None,
           scoring: tuple[Objective, str], on_step: Callable[[int, float], None] | None,
           on_eval: Callable[[int, float], None] | None) -> DistillResult:
    """The training loop of `distill` (`batches`: training, check; `scoring`: the objective and the mask input's
    name), with the block hooks (student's, teacher's) in place when block outputs are matched; the teacher runs
    here for what `targets` does not store."""
    train_batches, eval_batches = batches
    objective, mask_key = scoring
    eval_targets = _outputs(teacher, eval_batches) if objective.store_targets else None
    if config.freeze_embeddings:  # stays so after training: the student's tables keep requires_grad False
        for module in student.modules():
            if isinstance(module, torch.nn.Embedding):
                module.weight.requires_grad_(False)
    optimizer = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=config.lr,
                                  weight_decay=config.weight_decay)
    schedule = _schedule(optimizer, config)
    eval_every = config.eval_every or len(train_batches)
    best = initial = check_score(student, teacher, eval_batches, eval_targets, objective, mask_key)
    best_state, best_step = copy.deepcopy(student.state_dict()), 0
    result = DistillResult(objective.metric, best, initial, 0, [{"step": 0, "check": initial}])
    for step, index in enumerate(_batch_order(len(train_batches), config.steps, config.seed), start=1):
        student.train(config.dropout)
        batch = train_batches[index]
        output = student(**batch)
        teacher_runs = targets.outputs is None or (hooks is not None and targets.states is None)
        if teacher_runs:
            with torch.no_grad():
                teacher_output = teacher(**batch)
        wanted = targets.outputs[index] if targets.outputs is not None else teacher_output
        loss = objective.loss(output, wanted, batch.get(mask_key), config)
        if hooks is not None:
            student_blocks, teacher_blocks = hooks
            if targets.states is None:
                theirs = teacher_blocks.take()
            else:
                theirs = [state.float() for state in targets.states[index]]
            loss = loss + config.hidden_weight * hidden_state_loss(student_blocks.take(), theirs, batch.get(mask_key))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        loss = loss.detach()
        if on_step is not None:
            on_step(step, float(loss))
        if step % eval_every == 0 or step == config.steps:
            score = check_score(student, teacher, eval_batches, eval_targets, objective, mask_key)
            result.history.append({"step": step, "train_loss": float(loss), "check": score})
            if on_eval is not None:
                on_eval(step, score)
            if objective.better(score, best):
                best, best_step, best_state = score, step, copy.deepcopy(student.state_dict())
    student.load_state_dict(best_state)
    student.eval()
    result.best, result.best_step = best, best_step
    return result
