"""The settings of label-free distillation, in a module without torch so that the CLI can show their defaults.

The defaults are what measured best on all-MiniLM-L6-v2 at ρ=0.5 (README, "Accuracy recovery"): lr 3e-4
(6e-4 was worse), the per-block hidden-state loss at weight 1 (0.965 against 0.959 without it), dropout off,
embedding tables trained.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class DistillConfig:
    steps: int = 1000
    lr: float = 3e-4  # AdamW peak learning rate
    weight_decay: float = 0.01
    warmup_fraction: float = 0.05
    mse_weight: float = 1.0
    hidden_weight: float = 1.0  # weight of the per-block hidden-state loss (used when hidden_modules are given)
    dropout: bool = False
    freeze_embeddings: bool = False  # True: leave nn.Embedding tables as compression left them (faster)
    eval_every: int | None = 200  # None: once per pass over the training batches
    seed: int = 0
