"""The settings of `lrdeploy distill`, importable without torch or ONNX Runtime (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from lrdeploy.errors import OptionError
from lrdeploy.lowrank.allocate import check_budget_range
from lrdeploy.settings.build import check_token_options
from lrdeploy.torch.distill_config import DistillConfig

TRAIN_TEXTS = ("pydoc+docstrings", "pydoc")  # unlabeled training sentences; the evaluation ones are always left out


@dataclass
class DistillSettings:
    """What `lrdeploy distill` builds (budget or target, allocation, ...) and how it trains (`training`)."""

    hf_dir: Path
    output_dir: Path
    rank_budget: float = 0.5
    target_cosine: float | None = None  # search the smallest budget meeting it after distillation
    method: str = "pca"
    allocation: str = "sensitivity"
    refit: bool = False
    rank_multiple: int | None = None  # None: as `build` (64 with a GPU profile, else 16)
    batch_size: int = 32
    calib_sentences: int = 512
    eval_sentences: int = 1000
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

    def check(self) -> None:
        """Budget and target are fractions in (0, 1] (checked before anything is exported)."""
        check_budget_range(self.rank_budget)
        check_token_options(self.check_tokens, self.target_latency, self.profile)
        if self.target_cosine is not None and not 0.0 < self.target_cosine <= 1.0:
            raise OptionError(f"--target-cosine {self.target_cosine} is outside (0, 1]; pass e.g. --target-cosine 0.98")
