"""The settings of `lrdeploy distill`, importable without torch or ONNX Runtime (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lrdeploy.errors import OptionError
from lrdeploy.settings.build import CutSettings, FactorizationSettings, PlanSettings, grouped
from lrdeploy.torch.distill_config import DistillConfig

TRAIN_TEXTS = ("pydoc+docstrings", "pydoc")  # unlabeled training sentences; the evaluation ones are always left out
DISTILL_TASKS = ("auto", "feature-extraction", "text-generation", "text-generation-with-past")  # auto: config.json
LM_BATCH = 8  # training windows per step for a causal LM (its logits: batch × tokens × vocabulary floats, ~8 copies)
EMBEDDER_BATCH = 32


def distill_factorization() -> FactorizationSettings:
    """Distillation's default split: ranks allocated by measured sensitivity (training recovers the rest)."""
    return FactorizationSettings(allocation="sensitivity")


def distill_planning() -> PlanSettings:
    """Distillation's default plan: low-rank splits only (`--plan unified` distills the unified plan's cuts)."""
    return PlanSettings(plan="lowrank")


DISTILL_GROUPS = {"factorization": distill_factorization, "cuts": CutSettings, "planning": distill_planning}


@dataclass(kw_only=True)
class DistillSettings:
    """What `lrdeploy distill` builds (the build's factorization, cuts and plan groups) and how it trains
    (`training`). A sentence embedder trains on pydoc sentences; a causal LM (`task` text-generation[-with-past])
    on windows of `window_tokens` tokens, its held-out windows from pydoc documents it never trains on."""

    hf_dir: Path
    output_dir: Path
    task: str = "auto"  # "auto": a causal LM where config.json's architecture is a …ForCausalLM, else an embedder
    target_cosine: float | None = None  # search the smallest budget meeting it after distillation
    optimize: str = "none"  # "ort": plan on ONNX Runtime's fused graph and write the student fused
    factorization: FactorizationSettings = field(default_factory=distill_factorization)
    cuts: CutSettings = field(default_factory=CutSettings)  # applied first (the ONNX path chooses, training recovers)
    planning: PlanSettings = field(default_factory=distill_planning)
    batch_size: int | None = None  # the training batch; None: EMBEDDER_BATCH sentences, or LM_BATCH windows
    calib_sentences: int = 512
    eval_sentences: int = 1000
    window_tokens: int = 128  # a causal LM's text windows
    calib_windows: int = 128
    eval_windows: int = 64
    train_text: str = "pydoc+docstrings"
    training: DistillConfig = field(default_factory=DistillConfig)

    @classmethod
    def from_options(cls, **options: Any) -> DistillSettings:
        """Settings from flat option names (the CLI's), the build's ones routed to their groups over distill's
        defaults."""
        return cls(**grouped(options, DISTILL_GROUPS))

    def resolved_task(self) -> str:
        """The task: as given, or read from config.json's architectures (…ForCausalLM: text-generation)."""
        if self.task != "auto":
            return self.task
        import json

        try:
            config = json.loads((Path(self.hf_dir) / "config.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return "feature-extraction"  # the folder check names what is wrong with it
        causal = any(str(name).endswith("ForCausalLM") for name in config.get("architectures") or [])
        return "text-generation" if causal else "feature-extraction"

    def causal_lm(self) -> bool:
        return self.resolved_task() != "feature-extraction"

    def training_batch(self) -> int:
        return self.batch_size or (LM_BATCH if self.causal_lm() else EMBEDDER_BATCH)

    def check(self) -> None:
        """Budget and target are fractions in (0, 1] (checked before anything is exported)."""
        if self.task not in DISTILL_TASKS:
            raise OptionError(f"--task {self.task!r} is not one of {', '.join(DISTILL_TASKS)}")
        if self.target_cosine is not None and self.causal_lm():
            raise OptionError("--target-cosine searches a budget by the embedding's cosine; a causal LM is judged "
                              "by perplexity: pass --rank-budget (and compare budgets with `lrdeploy sweep`)")
        for group in (self.factorization, self.cuts, self.planning):
            group.check()
        if self.target_cosine is not None and not 0.0 < self.target_cosine <= 1.0:
            raise OptionError(f"--target-cosine {self.target_cosine} is outside (0, 1]; pass e.g. --target-cosine 0.98")
