"""The settings of `lrdeploy distill`, importable without torch or ONNX Runtime (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lrdeploy.errors import OptionError
from lrdeploy.lowrank.allocate import check_budget_range
from lrdeploy.settings.build import check_token_options
from lrdeploy.torch.distill_config import DistillConfig

TRAIN_TEXTS = ("pydoc+docstrings", "pydoc")  # unlabeled training sentences; the evaluation ones are always left out
DISTILL_TASKS = ("auto", "feature-extraction", "text-generation", "text-generation-with-past")  # auto: config.json
LM_BATCH = 8  # training windows per step for a causal LM (its logits: batch × tokens × vocabulary floats, ~8 copies)
EMBEDDER_BATCH = 32


@dataclass
class DistillSettings:
    """What `lrdeploy distill` builds (budget or target, allocation, ...) and how it trains (`training`). A
    sentence embedder trains on pydoc sentences; a causal LM (`task` text-generation[-with-past]) on windows of
    `window_tokens` tokens, its held-out windows from pydoc documents it never trains on."""

    hf_dir: Path
    output_dir: Path
    task: str = "auto"  # "auto": a causal LM where config.json's architecture is a …ForCausalLM, else an embedder
    rank_budget: float = 0.5
    target_cosine: float | None = None  # search the smallest budget meeting it after distillation
    method: str = "pca"
    allocation: str = "sensitivity"
    refit: bool = False
    rank_multiple: int | None = None  # None: as `build` (64 with a GPU profile, else 16)
    batch_size: int | None = None  # None: EMBEDDER_BATCH sentences, or LM_BATCH windows for a causal LM
    calib_sentences: int = 512
    eval_sentences: int = 1000
    window_tokens: int = 128  # a causal LM's text windows
    calib_windows: int = 128
    eval_windows: int = 64
    sensitivity_samples: int = 16  # calibration samples each measured option runs on (as `build`)
    train_text: str = "pydoc+docstrings"
    ffn_keep: float | None = None  # narrow the FFN blocks first (the ONNX path chooses, distillation recovers)
    heads_keep: float | None = None  # likewise for every self-attention's heads
    values_keep: float | None = None  # likewise for every head's value/output width
    plan: str = "lowrank"  # "unified": the ONNX path's unified plan chooses ranks, FFN widths and heads
    target_latency: float | None = None  # with tokens: plan for this fraction of dense latency (measured here)
    tokens: int = 4096
    check_tokens: tuple[int, ...] = ()  # the measured-here target holds at these rows too (e.g. 128: batch 1)
    profile: str | None = None  # plan the latency target from a device profile instead of measuring here
    optimize: str = "none"  # "ort": plan on ONNX Runtime's fused graph and write the student fused
    training: DistillConfig = field(default_factory=DistillConfig)

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
        check_budget_range(self.rank_budget)
        check_token_options(self.check_tokens, self.target_latency, self.profile)
        if self.target_cosine is not None and not 0.0 < self.target_cosine <= 1.0:
            raise OptionError(f"--target-cosine {self.target_cosine} is outside (0, 1]; pass e.g. --target-cosine 0.98")
