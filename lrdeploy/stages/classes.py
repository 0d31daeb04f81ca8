"""A compressed classifier's figures against its dense original, on held-out samples:

    logits [batch, classes] of both models
        top-1 agreement     argmax of the compressed model = argmax of the dense one (the label a user ships)
        KL(dense ‖ compressed)   Σ_c p_dense(c) (log p_dense(c) − log p_compressed(c)), mean over samples

What a fine-tuned classifier (sequence or image classification) is judged by, like perplexity for a language
model; accumulated batch by batch in float64."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lrdeploy.report.model import ClassAccuracy
from lrdeploy.stages.next_token import log_softmax


def is_class_logits(name: str, logits: np.ndarray) -> bool:
    """A classifier's logits: an output named as exporters name them ("logits"), one row of at least two classes
    per sample ([batch, classes])."""
    return "logit" in name.lower() and logits.ndim == 2 and logits.shape[1] >= 2


@dataclass
class ClassScores:
    """Running sums of the classifier figures over batches; `result()` gives the record."""

    samples: int = 0
    agreeing: int = 0
    kl: float = 0.0

    def add(self, dense: np.ndarray, compressed: np.ndarray) -> None:
        log_p, log_q = log_softmax(dense), log_softmax(compressed)
        self.kl += float((np.exp(log_p) * (log_p - log_q)).sum())
        self.agreeing += int((dense.argmax(axis=1) == compressed.argmax(axis=1)).sum())
        self.samples += dense.shape[0]

    def result(self) -> ClassAccuracy | None:
        if self.samples == 0:
            return None
        return ClassAccuracy(samples=self.samples, top1_agreement=self.agreeing / self.samples,
                             kl=self.kl / self.samples)
